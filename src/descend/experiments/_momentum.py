"""Momentum as noise smoothing: how much the update direction wanders from step to step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from descend import optim
from descend.experiments._common import Outcome, digits, flat, loss_of, minibatches, new_figure, seed_all
from descend.nn import MLP

BETAS = (0.0, 0.5, 0.9, 0.99)
WINDOW = 50


def _train(x: torch.Tensor, y: torch.Tensor, beta: float, lr: float, steps: int, seed: int) -> dict[str, Any]:
    """Minibatch (32) training with ``Momentum(beta)``; the per-step unit update directions and the loss."""
    n = len(y)
    gen = seed_all(seed)
    model = MLP(x.shape[1], 10, hidden=32, depth=1)
    params = list(model.parameters())
    opt = optim.Momentum(params, lr=lr, beta=beta)
    batches = minibatches(n, 32, gen)
    directions, curve = [], [(0, loss_of(model, x, y))]
    for t in range(1, steps + 1):
        idx = next(batches)
        before = flat(params)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        u = flat(params) - before
        directions.append(u / u.norm())
        if t % 10 == 0:
            curve.append((t, loss_of(model, x, y)))
    # skip the first 2 windows: the EMA starts at zero and needs ~1/(1-beta) steps to fill
    d = torch.stack(directions[2 * WINDOW : len(directions) // WINDOW * WINDOW])  # (T, P)
    windows = d.reshape(-1, WINDOW, d.shape[1])
    variance = float((1 - windows.mean(1).norm(dim=1) ** 2).mean())  # mean_t ||d_t - mean d||^2 per window
    cosine = float((d[1:] * d[:-1]).sum(1).mean())
    return {"beta": beta, "lr": lr, "variance": variance, "consecutive_cosine": cosine,
            "steps": [s for s, _ in curve], "loss": [v for _, v in curve], "final_loss": curve[-1][1]}


def momentum_noise(*, quick: bool = False, seed: int = 0) -> Outcome:
    """EMA momentum smooths the minibatch noise out of the update direction.

    A one-hidden-layer MLP (64-32-10) on digits, minibatches of 32, trained by
    :class:`descend.optim.Momentum` (``m <- a m + (1-a) g``, ``w <- w - lr m``) with
    ``a in {0, 0.5, 0.9, 0.99}`` (``a = 0`` is plain SGD) at the same learning rate 0.3. For every step
    the update ``u_t = w_{t+1} - w_t`` is normalised, ``d_t = u_t/||u_t||``; its step-to-step variance is
    ``mean ||d_t - mean_window(d)||^2 = 1 - ||mean_window(d)||^2`` over windows of 50 steps (1: directions
    uncorrelated, 0: a fixed direction), and the mean cosine of consecutive updates is reported too.
    Progress is the full training loss after the last step, at lr 0.3 and at each ``a``'s best
    learning rate of ``{0.1, 0.3, 1}``.
    """
    x, y, _, _ = digits(seed)
    steps = 400 if quick else 800
    runs = {beta: _train(x, y, beta, 0.3, steps, seed) for beta in BETAS}
    best = {}
    for beta in BETAS:
        candidates = [runs[beta]] + [_train(x, y, beta, lr, steps, seed) for lr in (0.1, 1.0)]
        best[beta] = min(candidates, key=lambda r: r["final_loss"] if r["final_loss"] == r["final_loss"] else 9e9)
    numbers: dict[str, Any] = {
        "steps": steps, "batch": 32, "lr": 0.3,
        "variance": {str(b): r["variance"] for b, r in runs.items()},
        "consecutive_cosine": {str(b): r["consecutive_cosine"] for b, r in runs.items()},
        "final_loss": {str(b): r["final_loss"] for b, r in runs.items()},
        "best_lr": {str(b): r["lr"] for b, r in best.items()},
        "best_final_loss": {str(b): r["final_loss"] for b, r in best.items()},
        "curves": {str(b): {"steps": r["steps"], "loss": r["loss"]} for b, r in runs.items()},
    }
    finding = [f"a={b:<4}: variance of the unit update {r['variance']:.3f}, consecutive cosine "
               f"{r['consecutive_cosine']:+.3f}, loss after {steps} steps {r['final_loss']:.4f} (lr 0.3); "
               f"best lr {best[b]['lr']:g}: {best[b]['final_loss']:.4f}" for b, r in runs.items()]

    fig, (ax1, ax2) = new_figure(2)
    for b, r in runs.items():
        ax1.plot(r["steps"], r["loss"], label=f"a = {b:g}")
    ax1.set_yscale("log")
    ax1.set_xlabel("step (minibatch 32)")
    ax1.set_ylabel("training loss")
    ax1.set_title("EMA momentum, lr 0.3")
    ax1.legend(fontsize=8)
    ax1.grid(True, alpha=0.3)
    labels = [f"{b:g}" for b in BETAS]
    pos = torch.arange(len(BETAS)).tolist()
    ax2.bar([p - 0.2 for p in pos], [runs[b]["variance"] for b in BETAS], width=0.4,
            label="variance of u/‖u‖ (50-step windows)")
    ax2.bar([p + 0.2 for p in pos], [runs[b]["consecutive_cosine"] for b in BETAS], width=0.4,
            label="cosine of consecutive updates")
    ax2.set_xticks(pos, labels)
    ax2.set_xlabel("momentum a")
    ax2.set_ylim(-0.05, 1.1)
    ax2.set_title("how much the direction wanders")
    ax2.legend(fontsize=8)
    ax2.grid(True, axis="y", alpha=0.3)
    return Outcome(numbers, fig, finding)
