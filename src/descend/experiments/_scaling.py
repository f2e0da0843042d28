"""Badly scaled problems: gradient descent is held back by its largest curvature, normalised methods are not."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from descend import optim
from descend.experiments._common import Outcome, digits, loss_of, new_figure, seed_all
from descend.nn import MLP

#: Method label -> constructor ``(params, lr) -> optimizer``.
METHODS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "GD": lambda p, lr: optim.SGD(p, lr=lr),
    "momentum 0.9": lambda p, lr: optim.Momentum(p, lr=lr, beta=0.9),
    "sign": lambda p, lr: optim.SignSGD(p, lr=lr),
    "softsign 0.9": lambda p, lr: optim.Softsign(p, lr=lr, beta=0.9),
    "Adam": lambda p, lr: optim.Adam(p, lr=lr),
}


def _finite(v: float) -> float:
    return v if math.isfinite(v) else float("inf")


def _quadratic(method: str, lr: float, curvatures: torch.Tensor, w0: torch.Tensor, steps: int) -> dict[str, Any]:
    """Minimise ``f(w) = 1/2 sum_i h_i w_i^2`` from ``w0``; the distance ``||w||/||w_0||`` per step."""
    w = nn.Parameter(w0.clone())
    opt = METHODS[method]([w], lr)
    distance = [1.0]
    norm0 = float(torch.linalg.vector_norm(w0))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (0.5 * (curvatures * w * w).sum()).backward()
        opt.step()
        distance.append(float(torch.linalg.vector_norm(w.detach())) / norm0)
    return {"lr": lr, "distance": distance, "final": _finite(distance[-1]), "w": w.detach().abs().tolist()}


def _network(method: str, lr: float, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> dict[str, Any]:
    """Full-batch training of an MLP 64-32-10; the training loss every 5 steps."""
    seed_all(seed)
    model = MLP(x.shape[1], 10, hidden=32, depth=1)
    opt = METHODS[method](list(model.parameters()), lr)
    curve = [loss_of(model, x, y)]
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            curve.append(float("inf"))
            break
        loss.backward()
        opt.step()
        if t % 5 == 0:
            curve.append(loss_of(model, x, y))
    return {"lr": lr, "loss": curve, "final": _finite(curve[-1])}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: r["final"])


def badly_scaled(*, quick: bool = False, seed: int = 0) -> Outcome:
    """Sign, softsign and Adam make progress on every coordinate; GD only where the curvature is large.

    Part 1, a quadratic ``f(w) = 1/2 sum_i h_i w_i^2`` in 50 dimensions with curvatures ``h_i``
    log-spaced from ``1e-4`` to ``1`` (condition number 1e4), started at ``w_i ~ U(0.5, 1.5)``: GD (``lr < 2/h_max``
    or it diverges, so the flat coordinates shrink by only ``(1 - lr h_i)`` per step), EMA momentum,
    signSGD, softsign momentum and Adam, each at the learning rate of a log grid that ends closest
    to the optimum; reported: ``||w_T|| / ||w_0||`` and the share of coordinates reduced 10-fold.
    Part 2, an MLP 64-32-10 trained full-batch on the digits whose standardised features are
    multiplied by scales log-spaced from ``1e-2`` to ``1e2`` (a 1e4 spread), each method at its best
    learning rate of a grid; reported: the final training loss, and GD's on the unscaled features.
    """
    steps_q = 150 if quick else 300
    steps_n = 100 if quick else 200
    curvatures = torch.logspace(-4, 0, 50, dtype=torch.float64).float()
    lr_grid = [10.0 ** (k / 2) for k in range(-8, 3)]  # 1e-4 .. 10
    w0 = 0.5 + torch.rand(50, generator=seed_all(seed))
    quad = {m: _best([_quadratic(m, lr, curvatures, w0, steps_q) for lr in lr_grid]) for m in METHODS}

    x, y, _, _ = digits(seed)
    scales = torch.logspace(-2, 2, x.shape[1])[torch.randperm(x.shape[1], generator=seed_all(seed))]
    x_bad = x * scales
    net_grid = [10.0 ** (k / 2) for k in (range(-6, 0) if quick else range(-7, 1))]
    net = {m: _best([_network(m, lr, x_bad, y, steps_n, seed) for lr in net_grid]) for m in METHODS}
    reference = _best([_network("GD", lr, x, y, steps_n, seed) for lr in (0.3, 1.0, 3.0)])

    numbers: dict[str, Any] = {
        "quadratic": {m: {"best_lr": r["lr"], "relative_distance": r["final"],
                          "fraction_reduced_10x": float((torch.tensor(r["w"]) < 0.1 * w0).double().mean())}
                      for m, r in quad.items()},
        "network": {m: {"best_lr": r["lr"], "final_loss": r["final"]} for m, r in net.items()},
        "network_gd_unscaled": {"best_lr": reference["lr"], "final_loss": reference["final"]},
        "quadratic_steps": steps_q, "network_steps": steps_n, "curvatures": curvatures.tolist(),
        "curves": {"quadratic": {m: r["distance"] for m, r in quad.items()},
                   "network": {m: r["loss"] for m, r in net.items()}},
    }
    finding = [f"quadratic, condition 1e4, {steps_q} steps: ||w_T||/||w_0|| = "
               + ", ".join(f"{m} {r['final']:.2g}" for m, r in quad.items()),
               "  share of coordinates reduced 10x: "
               + ", ".join(f"{m} {v['fraction_reduced_10x']:.2f}" for m, v in numbers["quadratic"].items()),
               f"MLP on digits with feature scales 1e-2..1e2, {steps_n} full-batch steps, final loss: "
               + ", ".join(f"{m} {r['final']:.3g}" for m, r in net.items())
               + f" (GD on unscaled features: {reference['final']:.3g})"]

    fig, (ax1, ax2, ax3) = new_figure(3, width=4.0)
    for m, r in quad.items():
        ax1.plot(r["distance"], label=f"{m} (lr {r['lr']:.2g})")
        ax2.plot(curvatures.tolist(), [max(v, 1e-8) for v in r["w"]], marker=".", markersize=3, label=m)
        ax3.plot([5 * i for i in range(len(net[m]["loss"]))], net[m]["loss"], label=f"{m} (lr {net[m]['lr']:.2g})")
    ax3.plot([5 * i for i in range(len(reference["loss"]))], reference["loss"], color="gray", linestyle=":",
             label="GD, unscaled features")
    ax1.set(yscale="log", xlabel="step", ylabel="‖w − w*‖ / ‖w₀ − w*‖", title="quadratic, curvatures 1e-4..1")
    ax2.set(xscale="log", yscale="log", xlabel="curvature h_i", ylabel=f"|w_i| after {steps_q} steps",
            title="what is left per coordinate")
    ax3.set(yscale="log", xlabel="full-batch step", ylabel="training loss", title="MLP, feature scales 1e-2..1e2")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return Outcome(numbers, fig, finding)
