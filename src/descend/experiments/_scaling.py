"""Badly scaled problems: gradient descent is held back by its largest curvature, normalised methods are not."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from descend import optim
from descend._random import generator, seed_everything
from descend.experiments._common import (
    PALETTE,
    Outcome,
    band,
    digits,
    finding,
    loss_of,
    new_figure,
    span,
    tune,
    tuned_dict,
)
from descend.nn import MLP

#: Method label -> constructor ``(params, lr) -> optimizer``.
METHODS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "GD": lambda p, lr: optim.SGD(p, lr=lr),
    "momentum 0.9": lambda p, lr: optim.Momentum(p, lr=lr, beta=0.9),
    "sign": lambda p, lr: optim.SignSGD(p, lr=lr),
    "softsign 0.9": lambda p, lr: optim.Softsign(p, lr=lr, beta=0.9),
    "Adam": lambda p, lr: optim.Adam(p, lr=lr),
}
FLOOR = 1e-12  # the per-coordinate panel draws smaller values (GD reaches exact zeros) at this floor
QUAD_GRID = {"GD": [0.3, 1.0, 1.9], "momentum 0.9": [3.0, 10.0, 30.0], "sign": [3e-3, 1e-2, 3e-2],
             "softsign 0.9": [3e-3, 1e-2, 3e-2], "Adam": [0.1, 0.3, 1.0]}
NET_GRID = {"GD": [3e-3, 1e-2, 3e-2], "momentum 0.9": [3e-3, 1e-2, 3e-2], "sign": [3e-4, 1e-3, 3e-3],
            "softsign 0.9": [3e-4, 1e-3, 3e-3], "Adam": [3e-4, 1e-3, 3e-3]}


TUNE_OFFSET = 1000  # quadratics for tuning are drawn with seed + 1000, never the reported ones


def _rotation(seed: int) -> torch.Tensor:
    """A random orthogonal ``[50, 50]`` matrix (QR of a Gaussian one, signs fixed), drawn by ``seed``."""
    q, r = torch.linalg.qr(torch.randn(50, 50, generator=generator(seed + 555), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _quadratic(method: str, lr: float, seed: int, steps: int, rotated: bool = False) -> tuple[float, dict[str, Any]]:
    """Minimise ``f(w) = 1/2 sum_i h_i u_i^2``, ``u = Q^T w`` (``h_i`` log-spaced 1e-4..1, 50 dims).

    ``Q`` is the identity (axis-aligned) or, with ``rotated``, a random rotation: the same curvatures
    along directions that mix every coordinate. The start has ``u_i ~ U(0.5, 1.5)`` in the eigenbasis.
    Returns ``||w_T||/||w_0||`` (the score), the distance per step and the final ``|u_i|/u0_i``.
    """
    curvatures = torch.logspace(-4, 0, 50, dtype=torch.float64).float()
    u0 = 0.5 + torch.rand(50, generator=generator(seed))
    q = _rotation(seed) if rotated else torch.eye(50)
    w = nn.Parameter(q @ u0)
    opt = METHODS[method]([w], lr)
    distance = [1.0]
    norm0 = float(u0.norm())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        u = q.T @ w
        (0.5 * (curvatures * u * u).sum()).backward()
        opt.step()
        distance.append(float(w.detach().norm()) / norm0)
        if not math.isfinite(distance[-1]) or distance[-1] > 1e6:
            return math.inf, {}
    return distance[-1], {"distance": distance, "shrink": ((q.T @ w.detach()).abs() / u0).tolist(),
                          "curvatures": curvatures.tolist()}


def _network(method: str, lr: float, seed: int, steps: int) -> tuple[float, dict[str, Any]]:
    """Full-batch MLP 64-32-10 on digits whose features are scaled by 1e-2..1e2: validation loss (the tuning
    score), the test loss every 5 steps and at the end."""
    data = digits(seed)
    scales = torch.logspace(-2, 2, 64)[torch.randperm(64, generator=generator(seed))]
    seed_everything(seed)
    model = MLP(64, 10, 32, 1)
    opt = METHODS[method](list(model.parameters()), lr)
    x, x_test = data.x * scales, data.x_test * scales
    curve = [loss_of(model, x_test, data.y_test)]
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), data.y).backward()
        opt.step()
        if t % 5 == 0:
            curve.append(loss_of(model, x_test, data.y_test))
            if not math.isfinite(curve[-1]):
                return math.inf, {}
    return loss_of(model, data.x_val * scales, data.y_val), {"test_loss": curve, "test_final": curve[-1]}


def badly_scaled(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """Sign, softsign and Adam shrink every coordinate of an axis-aligned ill-conditioned quadratic where GD shrinks
    only the steep ones; rotate the same quadratic and most of that advantage goes (signSGD falls behind GD).

    Part 1, a quadratic ``f(w) = 1/2 sum_i h_i u_i^2`` in 50 dimensions with curvatures ``h_i``
    log-spaced from ``1e-4`` to ``1`` (condition number 1e4), started at ``u_i ~ U(0.5, 1.5)``, in two
    orientations: axis-aligned (``u = w``, the best case for per-coordinate methods) and rotated
    (``u = Q^T w`` with ``Q`` a random rotation: every coordinate of ``w`` mixes flat and steep
    directions). GD (``lr < 2/h_max`` or it diverges), EMA momentum, signSGD, softsign momentum and
    Adam, each at the learning rate minimising the mean final ``||w_T||/||w_0||`` over seeds, tuned
    separately for each orientation on separately drawn quadratics (seed + 1000) on a grid extended at
    its edges. Part 2, an MLP 64-32-10 trained full-batch on the digits whose standardised features
    are multiplied by scales log-spaced from ``1e-2`` to ``1e2`` (a 1e4 spread; a random assignment
    per seed), each method at the learning rate minimising the mean final validation loss, reported
    on the test digits (never used for a choice).
    """
    n = len(seeds)
    tune_seeds = [s + TUNE_OFFSET for s in seeds]
    steps_q = 150 if quick else 300
    steps_n = 100 if quick else 200
    h = torch.logspace(-4, 0, 50, dtype=torch.float64).float()
    quad, qd, reduced = {}, {}, {}
    for orient in ("axis-aligned", "rotated"):
        rot = orient == "rotated"
        tuned = {m: tune(lambda lr, s, m=m, rot=rot: _quadratic(m, lr, s, steps_q, rot), QUAD_GRID[m], tune_seeds, 4)
                 for m in METHODS}
        runs = {m: [_quadratic(m, r.best_lr, s, steps_q, rot) for s in seeds] for m, r in tuned.items()}
        quad[orient] = {"tuning": tuned, "runs": runs}
        qd[orient] = {m: [v[0] for v in rr] for m, rr in runs.items()}
        reduced[orient] = {m: [sum(v < 0.1 for v in d[1]["shrink"]) / 50 if d[1] else 0.0 for d in rr]
                           for m, rr in runs.items()}
    net = {m: tune(lambda lr, s, m=m: _network(m, lr, s, steps_n), NET_GRID[m], seeds, 4) for m in METHODS}
    nt = {m: [d["test_final"] for d in r.details[r.best_lr]] for m, r in net.items()}
    # GD shrinks direction i by exactly |1 - lr h_i| per step: after T steps, 10-fold where |1 - lr h_i|^T < 0.1
    gd_lr = quad["axis-aligned"]["tuning"]["GD"].best_lr
    predicted = float(((1 - gd_lr * h).abs() ** steps_q < 0.1).double().mean())
    normalised = ("sign", "softsign 0.9", "Adam")
    ax_, rot_ = qd["axis-aligned"], qd["rotated"]
    soft_below = sum(a < b for a, b in zip(nt["softsign 0.9"], nt["GD"]))
    best_net_per_seed = [min(nt, key=lambda k, i=i: nt[k][i]) for i in range(n)]
    best_net = {m: best_net_per_seed.count(m) for m in METHODS}
    findings = [
        finding("normalised_reduce_every_coordinate",
                "axis-aligned: sign, softsign and Adam reduce every coordinate of the quadratic 10-fold",
                [all(reduced["axis-aligned"][m][i] == 1.0 for m in normalised) for i in range(n)]),
        finding("gd_leaves_flat_coordinates",
                f"axis-aligned: GD reduces only {span([100 * v for v in reduced['axis-aligned']['GD']], '.0f')}% of "
                f"them 10-fold: exactly the coordinates with |1 - lr h_i|^T < 0.1 ({100 * predicted:.0f}%), the "
                "flat ones are left",
                [abs(v - predicted) < 1e-9 and v < 1 for v in reduced["axis-aligned"]["GD"]]),
        finding("gd_rotation_invariant",
                f"GD ends at the same ||w_T||/||w_0|| on the rotated quadratic as on the axis-aligned one "
                f"({span(rot_['GD'])} against {span(ax_['GD'])}; within 1%)",
                [abs(r / a - 1) < 0.01 for r, a in zip(rot_["GD"], ax_["GD"])]),
        finding("rotation_hurts_normalised",
                f"rotated, sign, softsign and Adam each end at least 3x farther from the minimum than axis-aligned "
                f"(Adam {span(rot_['Adam'])} against {span(ax_['Adam'])}; sign {span(rot_['sign'])} against "
                f"{span(ax_['sign'])})",
                [all(rot_[m][i] > 3 * ax_[m][i] for m in normalised) for i in range(n)]),
        finding("rotated_normalised_leave_flat_directions",
                "rotated, none of sign, softsign and Adam reduces every eigen-direction 10-fold (they reduce "
                + ", ".join(f"{m} {span([100 * v for v in reduced['rotated'][m]], '.0f')}%" for m in normalised)
                + ")",
                [all(reduced["rotated"][m][i] < 1.0 for m in normalised) for i in range(n)]),
        finding("rotated_order",
                f"rotated, sign ends farther from the minimum than GD ({span(rot_['sign'])} against "
                f"{span(rot_['GD'])}), while softsign ({span(rot_['softsign 0.9'])}) and Adam ({span(rot_['Adam'])}) "
                "still end nearer",
                [rot_["sign"][i] > rot_["GD"][i] and rot_["softsign 0.9"][i] < rot_["GD"][i]
                 and rot_["Adam"][i] < rot_["GD"][i] for i in range(n)]),
        finding("sign_and_adam_beat_gd_on_scaled_net",
                f"on the badly scaled digits net signSGD and Adam each end with a lower test loss than GD "
                f"({span(nt['sign'])} and {span(nt['Adam'])} against {span(nt['GD'])}; softsign momentum "
                f"{span(nt['softsign 0.9'])}, lower than GD on {soft_below} of {n} seeds)",
                [nt["sign"][i] < nt["GD"][i] and nt["Adam"][i] < nt["GD"][i] for i in range(n)]),
    ]
    notes = [f"quadratic {o}, {m}: lr {r.best_lr:.3g}{' (at the grid edge)' if r.at_edge else ''}, ||w_T||/||w_0|| "
             f"{span(qd[o][m])}, eigen-directions reduced 10-fold {span([100 * v for v in reduced[o][m]], '.0f')}%"
             for o in quad for m, r in quad[o]["tuning"].items()]
    notes += [f"scaled digits, {m}: lr {r.best_lr:g}{' (at the grid edge)' if r.at_edge else ''}, validation loss "
              f"{span(r.scores[r.best_lr])}, test loss {span(nt[m])}, lowest test loss of the five on "
              f"{best_net[m]} of {n} seeds" for m, r in net.items()]
    numbers: dict[str, Any] = {
        "quadratic_steps": steps_q, "network_steps": steps_n,
        "quadratic": {o: {m: {"tuning": tuned_dict(r), "relative_distance": qd[o][m],
                              "fraction_reduced_10x": reduced[o][m]} for m, r in quad[o]["tuning"].items()}
                      for o in quad},
        "network": {m: {"tuning": tuned_dict(r), "test_loss": nt[m]} for m, r in net.items()},
    }

    fig, axes = new_figure(2, width=5.0, height=3.9, nrows=2)
    ax1, ax1r, ax2, ax3 = axes
    for (m, color) in zip(METHODS, PALETTE):
        for ax, o in ((ax1, "axis-aligned"), (ax1r, "rotated")):
            r = quad[o]["tuning"][m]
            band(ax, range(steps_q + 1), [d[1]["distance"] for d in quad[o]["runs"][m]], color,
                 f"{m} (lr {r.best_lr:.2g})")
        for o, style in (("axis-aligned", "-"), ("rotated", ":")):
            shrink = torch.tensor([d[1]["shrink"] for d in quad[o]["runs"][m]])
            ax2.plot(h.tolist(), shrink.mean(0).clamp_min(FLOOR).tolist(), marker="." if style == "-" else None,
                     markersize=3, color=color, linestyle=style, label=m if style == "-" else None)
        nr = net[m]
        rows = nr.details[nr.best_lr]
        band(ax3, [5 * i for i in range(len(rows[0]["test_loss"]))], [d["test_loss"] for d in rows], color,
             f"{m} (lr {nr.best_lr:.2g})")
    ax1.set(yscale="log", xlabel="step", ylabel="‖w_t‖ / ‖w₀‖ (minimum at 0)",
            title="axis-aligned quadratic, h 1e-4..1")
    ax1r.set(yscale="log", xlabel="step", ylabel="‖w_t‖ / ‖w₀‖ (minimum at 0)", title="the same quadratic, rotated")
    ax1r.set_ylim(ax1.get_ylim())
    ax2.set(xscale="log", yscale="log", xlabel="curvature h_i", ylabel=f"|u_i| / |u₀_i| after {steps_q} steps",
            title="left per eigen-direction (mean)\nsolid: axis-aligned, dotted: rotated\n"
                  f"(below {FLOOR:g}, and 0, drawn at {FLOOR:g})")
    ax3.set(yscale="log", xlabel="full-batch step", ylabel="test loss (cross-entropy)",
            title="MLP, feature scales 1e-2..1e2\n(tuned on validation)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return Outcome(numbers, fig, findings, notes)
