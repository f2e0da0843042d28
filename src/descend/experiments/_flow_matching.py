"""A generative model is function approximation too: flow matching learns a velocity field on 2-D points."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from descend import optim
from descend._random import generator, seed_everything
from descend.experiments._common import PALETTE, Outcome, band, finding, new_figure, span, tune, tuned_dict
from descend.nn import MLP
from descend.train import Minibatch

POINTS, HELD_OUT, SAMPLES = 4000, 1000, 1000
BATCH, EULER = 256, 50
BANDWIDTHS = (0.1, 0.3, 1.0)


def moons(n: int, seed: int) -> Tensor:
    """``n`` points of two interleaved half circles with Gaussian noise 0.05, centred: ``[n, 2]``."""
    g = generator(seed)
    upper = torch.rand(n, generator=g) < 0.5
    angle = math.pi * torch.rand(n, generator=g)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], 1)
    return points + 0.05 * torch.randn(n, 2, generator=g)


def mmd(a: Tensor, b: Tensor) -> float:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (bandwidths 0.1, 0.3, 1), biased estimate.

    ``MMD^2 = mean k(a, a') + mean k(b, b') - 2 mean k(a, b)``; 0 when the two samples are identical.
    """
    def k(x: Tensor, y: Tensor) -> Tensor:
        d2 = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in BANDWIDTHS).mean()

    return float(k(a, a) + k(b, b) - 2 * k(a, b))


def sample(model: nn.Module, n: int, seed: int) -> Tensor:
    """Integrate ``dx/dt = v(x, t)`` from ``x_0 ~ N(0, I)`` at ``t = 0`` to ``t = 1`` with 50 Euler steps."""
    x = torch.randn(n, 2, generator=generator(seed + 12345))
    with torch.no_grad():
        for i in range(EULER):
            t = torch.full((n, 1), i / EULER)
            x = x + model(torch.cat([x, t], 1)) / EULER
    return x


def _fm_loss(model: nn.Module, x1: Tensor, g: torch.Generator) -> Tensor:
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(len(x1), 1, generator=g)
    xt = (1 - t) * x0 + t * x1
    return nn.functional.mse_loss(model(torch.cat([xt, t], 1)), x1 - x0)


def _train(lr: float, seed: int, steps: int) -> tuple[float, dict[str, Any]]:
    """Flow matching on the moons: the held-out flow-matching loss, and the MMD of samples every tenth of training."""
    data, held = moons(POINTS, seed), moons(HELD_OUT, seed + 1000)
    seed_everything(seed)
    model = MLP(3, 2, 128, 3, "gelu")
    opt = optim.Adam(model.parameters(), lr=lr)
    sampler = Minibatch(POINTS, BATCH, seed=seed)
    g = generator(seed + 1)
    every = steps // 10
    curve = [mmd(sample(model, SAMPLES, seed), held)]
    for step in range(1, steps + 1):
        (idx,) = sampler.next_step()
        for group in opt.param_groups:  # cosine decay to zero
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        opt.zero_grad(set_to_none=True)
        loss = _fm_loss(model, data[idx], g)
        if not torch.isfinite(loss):
            return math.inf, {}
        loss.backward()
        opt.step()
        if step % every == 0:
            curve.append(mmd(sample(model, SAMPLES, seed), held))
    with torch.no_grad():
        val = float(_fm_loss(model, held, generator(seed + 2)))
    return val, {"mmd": curve, "samples": sample(model, SAMPLES, seed), "model": model}


def flow_matching(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """A small flow-matching model, trained by descend on 2-D points, generates samples close to the data.

    Generative modelling reduces to approximating an unknown function: here the velocity field
    ``v(x, t)`` that carries Gaussian noise ``x_0 ~ N(0, I)`` to the data ``x_1`` (two moons, 4,000 points
    per seed). An MLP (inputs ``(x, t)``, 3 hidden layers of 128, GELU) is fitted by Adam (minibatches of
    256, learning rate cosine-decayed to zero) to ``v(x_t, t) ~ x_1 - x_0`` at
    ``x_t = (1 - t) x_0 + t x_1``, ``t ~ U(0, 1)`` (conditional flow matching with straight paths);
    its learning rate is tuned on the mean held-out flow-matching loss.
    Samples come from 50 Euler steps of ``dx/dt = v(x, t)``; their quality is the squared MMD (Gaussian
    kernels of bandwidth 0.1, 0.3 and 1) against 1,000 held-out points, next to two references: the
    noise itself, and a second held-out sample of the data (what a perfect model would score).
    """
    steps = 600 if quick else 1200
    n = len(seeds)
    tuned = tune(lambda lr, s: _train(lr, s, steps), [3e-3, 1e-2, 3e-2], seeds, 2)
    runs = tuned.details[tuned.best_lr]
    final = [d["mmd"][-1] for d in runs]
    noise = [mmd(torch.randn(SAMPLES, 2, generator=generator(s + 12345)), moons(HELD_OUT, s + 1000)) for s in seeds]
    floor = [mmd(moons(SAMPLES, s + 2000), moons(HELD_OUT, s + 1000)) for s in seeds]
    findings = [
        finding("samples_close_to_data",
                f"after {steps} steps the samples' MMD² to held-out data is {span(final)}, under a third of the "
                f"noise's they start from ({span(noise)})", [f < z / 3 for f, z in zip(final, noise)]),
        finding("quality_improves",
                f"the MMD² falls over the second half of training (step {steps // 2}: "
                f"{span([d['mmd'][5] for d in runs])})", [d["mmd"][-1] < d["mmd"][5] for d in runs]),
        finding("within_10x_of_floor",
                f"the samples' MMD² is within 10x of a second sample of the data itself ({span(floor)})",
                [f < 10 * fl for f, fl in zip(final, floor)]),
    ]
    notes = [f"learning rate {tuned.best_lr:g}{' (at the grid edge)' if tuned.at_edge else ''}; held-out "
             f"flow-matching loss {span(tuned.scores[tuned.best_lr])}"]
    numbers: dict[str, Any] = {"steps": steps, "tuning": tuned_dict(tuned), "mmd_curves": [d["mmd"] for d in runs],
                               "mmd_final": final, "mmd_noise": noise, "mmd_data_floor": floor}

    fig, (ax1, ax2, ax3) = new_figure(3, width=4.2, height=3.8)
    held = moons(HELD_OUT, seeds[0] + 1000)
    gen = runs[0]["samples"]
    ax1.scatter(held[:, 0].tolist(), held[:, 1].tolist(), s=3, color=PALETTE[0], alpha=0.5, label="held-out data")
    ax1.scatter(gen[:, 0].tolist(), gen[:, 1].tolist(), s=3, color=PALETTE[1], alpha=0.5, label="generated")
    ax1.set(xlabel="x₁", ylabel="x₂", title=f"two moons, seed {seeds[0]}", aspect="equal")
    ax1.legend(fontsize=7, loc="lower left", markerscale=3)
    x = [i * (steps // 10) for i in range(len(runs[0]["mmd"]))]
    band(ax2, x, [d["mmd"] for d in runs], PALETTE[1], f"generated (lr {tuned.best_lr:g})")
    ax2.axhline(sum(noise) / n, color="gray", linestyle=":", label="noise N(0, I)")
    ax2.axhline(sum(floor) / n, color=PALETTE[0], linestyle="--", label="another sample of the data")
    ax2.set(yscale="log", xlabel="training step (minibatch 256)", ylabel="MMD² to held-out data",
            title="sample quality over training")
    ax2.legend(fontsize=7)
    model = runs[0]["model"]
    grid = torch.linspace(-2, 2, 17)
    pts = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        v = model(torch.cat([pts, torch.full((len(pts), 1), 0.5)], 1))
    ax3.quiver(pts[:, 0].tolist(), pts[:, 1].tolist(), v[:, 0].tolist(), v[:, 1].tolist(), color=PALETTE[2])
    ax3.set(xlabel="x₁", ylabel="x₂", title="learned velocity v(x, t = 0.5)", aspect="equal")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
    for d in runs:
        d.pop("model")
    return Outcome(numbers, fig, findings, notes)
