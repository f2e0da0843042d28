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
QUAD_GRID = {"GD": [0.3, 1.0, 1.9], "momentum 0.9": [0.3, 1.0, 3.0], "sign": [1e-3, 3e-3, 1e-2],
             "softsign 0.9": [1e-3, 3e-3, 1e-2], "Adam": [1e-3, 3e-3, 1e-2]}
NET_GRID = {"GD": [1e-3, 1e-2, 1e-1], "momentum 0.9": [1e-3, 1e-2, 1e-1], "sign": [1e-4, 1e-3, 1e-2],
            "softsign 0.9": [1e-4, 1e-3, 1e-2], "Adam": [1e-4, 1e-3, 1e-2]}


def _quadratic(method: str, lr: float, seed: int, steps: int) -> tuple[float, dict[str, Any]]:
    """Minimise ``f(w) = 1/2 sum_i h_i w_i^2`` (``h_i`` log-spaced 1e-4..1, 50 dims) from ``w_i ~ U(0.5, 1.5)``.

    Returns ``||w_T||/||w_0||`` (the score) and the distance per step and final ``|w_i|/w0_i``.
    """
    curvatures = torch.logspace(-4, 0, 50, dtype=torch.float64).float()
    w0 = 0.5 + torch.rand(50, generator=generator(seed))
    w = nn.Parameter(w0.clone())
    opt = METHODS[method]([w], lr)
    distance = [1.0]
    norm0 = float(w0.norm())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (0.5 * (curvatures * w * w).sum()).backward()
        opt.step()
        distance.append(float(w.detach().norm()) / norm0)
        if not math.isfinite(distance[-1]) or distance[-1] > 1e6:
            return math.inf, {}
    return distance[-1], {"distance": distance, "shrink": (w.detach().abs() / w0).tolist(),
                          "curvatures": curvatures.tolist()}


def _network(method: str, lr: float, seed: int, steps: int) -> tuple[float, dict[str, Any]]:
    """Full-batch MLP 64-32-10 on digits whose features are scaled by 1e-2..1e2: validation loss, the curve."""
    data = digits(seed)
    scales = torch.logspace(-2, 2, 64)[torch.randperm(64, generator=generator(seed))]
    seed_everything(seed)
    model = MLP(64, 10, 32, 1)
    opt = METHODS[method](list(model.parameters()), lr)
    x = data.x * scales
    curve = [loss_of(model, x, data.y)]
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), data.y).backward()
        opt.step()
        if t % 5 == 0:
            curve.append(loss_of(model, x, data.y))
            if not math.isfinite(curve[-1]):
                return math.inf, {}
    return loss_of(model, data.x_val * scales, data.y_val), {"loss": curve}


def badly_scaled(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """Sign, softsign and Adam make progress on every coordinate; GD only where the curvature is large.

    Part 1, a quadratic ``f(w) = 1/2 sum_i h_i w_i^2`` in 50 dimensions with curvatures ``h_i``
    log-spaced from ``1e-4`` to ``1`` (condition number 1e4), started at ``w_i ~ U(0.5, 1.5)`` (per
    seed): GD (``lr < 2/h_max`` or it diverges), EMA momentum, signSGD, softsign momentum and Adam, each
    at the learning rate minimising the mean final ``||w_T||/||w_0||`` over seeds (grid extended at its
    edges). Part 2, an MLP 64-32-10 trained full-batch on the digits whose standardised features are
    multiplied by scales log-spaced from ``1e-2`` to ``1e2`` (a 1e4 spread; a random assignment per
    seed), each method at the learning rate minimising the mean final validation loss.
    """
    n = len(seeds)
    steps_q = 150 if quick else 300
    steps_n = 100 if quick else 200
    quad = {m: tune(lambda lr, s, m=m: _quadratic(m, lr, s, steps_q), QUAD_GRID[m], seeds, 4) for m in METHODS}
    net = {m: tune(lambda lr, s, m=m: _network(m, lr, s, steps_n), NET_GRID[m], seeds, 4) for m in METHODS}
    qd = {m: r.scores[r.best_lr] for m, r in quad.items()}
    nv = {m: r.scores[r.best_lr] for m, r in net.items()}
    reduced = {m: [sum(v < 0.1 for v in d["shrink"]) / 50 for d in r.details[r.best_lr]] for m, r in quad.items()}
    # GD shrinks coordinate i by exactly |1 - lr h_i| per step: after T steps, 10-fold where |1 - lr h_i|^T < 0.1
    h = torch.logspace(-4, 0, 50, dtype=torch.float64).float()
    predicted = float(((1 - quad["GD"].best_lr * h).abs() ** steps_q < 0.1).double().mean())
    findings = [
        finding("normalised_reduce_every_coordinate",
                "sign, softsign and Adam reduce every coordinate of the quadratic 10-fold",
                [all(reduced[m][i] == 1.0 for m in ("sign", "softsign 0.9", "Adam")) for i in range(n)]),
        finding("gd_leaves_flat_coordinates",
                f"GD reduces only {span([100 * v for v in reduced['GD']], '.0f')}% of them 10-fold: exactly the "
                f"coordinates with |1 - lr h_i|^T < 0.1 ({100 * predicted:.0f}%), the flat ones are left",
                [abs(v - predicted) < 1e-9 and v < 1 for v in reduced["GD"]]),
        finding("adam_beats_gd_on_scaled_net",
                f"on the badly scaled digits Adam ends with a lower validation loss than GD ({span(nv['Adam'])} "
                f"against {span(nv['GD'])})", [a < b for a, b in zip(nv["Adam"], nv["GD"])]),
        finding("softsign_beats_gd_on_scaled_net",
                f"softsign momentum also ends lower than GD ({span(nv['softsign 0.9'])} against {span(nv['GD'])})",
                [a < b for a, b in zip(nv["softsign 0.9"], nv["GD"])]),
        finding("adam_best_on_scaled_net",
                "Adam ends with the lowest validation loss of the five methods",
                [all(nv["Adam"][i] <= nv[m][i] for m in METHODS) for i in range(n)]),
    ]
    notes = [f"quadratic, {m}: lr {r.best_lr:g}{' (at the grid edge)' if r.at_edge else ''}, ||w_T||/||w_0|| "
             f"{span(qd[m])}" for m, r in quad.items()]
    notes += [f"scaled digits, {m}: lr {r.best_lr:g}{' (at the grid edge)' if r.at_edge else ''}, validation loss "
              f"{span(nv[m])}" for m, r in net.items()]
    numbers: dict[str, Any] = {
        "quadratic_steps": steps_q, "network_steps": steps_n,
        "quadratic": {m: {"tuning": tuned_dict(r), "relative_distance": qd[m], "fraction_reduced_10x": reduced[m]}
                      for m, r in quad.items()},
        "network": {m: {"tuning": tuned_dict(r), "val_loss": nv[m]} for m, r in net.items()},
    }

    fig, (ax1, ax2, ax3) = new_figure(3, width=4.2, height=3.6)
    for (m, r), color in zip(quad.items(), PALETTE):
        details = r.details[r.best_lr]
        band(ax1, range(steps_q + 1), [d["distance"] for d in details], color, f"{m} (lr {r.best_lr:.2g})")
        shrink = torch.tensor([d["shrink"] for d in details])
        ax2.plot(details[0]["curvatures"], shrink.mean(0).clamp_min(FLOOR).tolist(), marker=".", markersize=3,
                 color=color, label=m)
        nr = net[m]
        band(ax3, [5 * i for i in range(len(nr.details[nr.best_lr][0]["loss"]))],
             [d["loss"] for d in nr.details[nr.best_lr]], color, f"{m} (lr {nr.best_lr:.2g})")
    ax1.set(yscale="log", xlabel="step", ylabel="‖w − w*‖ / ‖w₀ − w*‖", title="quadratic, curvatures 1e-4..1")
    ax2.set(xscale="log", yscale="log", xlabel="curvature h_i", ylabel=f"|w_i| / |w₀_i| after {steps_q} steps",
            title="what is left per coordinate (mean)\n(values below 1e-12, and 0, drawn at 1e-12)")
    ax3.set(yscale="log", xlabel="full-batch step", ylabel="training loss (cross-entropy)",
            title="MLP, feature scales 1e-2..1e2")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return Outcome(numbers, fig, findings, notes)
