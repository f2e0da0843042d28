"""Regression on point sets: PointSetDecoder predicts a 1-D function at new locations, with its uncertainty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from descend import optim
from descend._random import seed_everything
from descend.data._base import Split
from descend.experiments._common import PALETTE, Outcome, finding, new_figure, span, tune, tuned_dict
from descend.nn import PointSetDecoder
from descend.train import Minibatch

MIN_SIGMA = 1e-3


def _gaussian(out: Tensor) -> tuple[Tensor, Tensor]:
    """The decoder's two outputs per query as a mean and a standard deviation ``softplus(raw) + 1e-3``."""
    return out[..., :1], nn.functional.softplus(out[..., 1:]) + MIN_SIGMA


def _nll(model: nn.Module, split: Split) -> Tensor:
    mean, sigma = _gaussian(model(*split.inputs))
    return nn.functional.gaussian_nll_loss(mean, split.targets, sigma**2, full=True)


def _train(lr: float, seed: int, functions: int, steps: int) -> tuple[float, dict[str, Any]]:
    """Adam (minibatches of 64 functions, cosine decay) on the Gaussian negative log-likelihood; validation NLL."""
    from descend.data.points import make_gp1d

    bundle = make_gp1d(n_functions=functions, seed=seed)
    seed_everything(seed)
    model = PointSetDecoder(1, 1, 2, width=32, depth=1)
    opt = optim.Adam(model.parameters(), lr=lr)
    sampler = Minibatch(len(bundle.train), 64, seed=seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        (idx,) = sampler.next_step()
        opt.zero_grad(set_to_none=True)
        loss = _nll(model, bundle.train.subset(idx))
        if not torch.isfinite(loss):
            return math.inf, {}
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        val = float(_nll(model, bundle.val))
    return val, {"model": model, "test": bundle.test}


def point_set_regression(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """Attention over a context set predicts a function at new points better than the nearest point, with error bars.

    :func:`descend.data.points.make_gp1d` draws 1-D functions from Gaussian processes (length scale
    0.25..1) seen at 3 to 20 noisy context points. A :class:`descend.nn.PointSetDecoder` (width 32, one
    block) reads the context set and predicts, at each query location, a mean and a standard deviation
    ``sigma`` (a neural-process-style regression), trained by Adam on the Gaussian negative
    log-likelihood, its learning rate tuned on the mean validation NLL over seeds. On the test functions:
    the squared error against the nearest context point's value
    (:func:`descend.data.points.nearest_context_value`), by number of context points, and the share of
    true values inside ``mean +- 2 sigma``.
    """
    from descend.data.points import nearest_context_value

    functions, steps = (3000, 300) if quick else (6000, 600)
    tuned = tune(lambda lr, s: _train(lr, s, functions, steps), [1e-3, 3e-3], seeds, 2)
    runs = tuned.details[tuned.best_lr]
    mse, nn_mse, coverage, by_count = [], [], [], []
    for d in runs:
        test, model = d["test"], d["model"]
        with torch.no_grad():
            mean, sigma = _gaussian(model(*test.inputs))
        base = nearest_context_value(*test.inputs)
        err = ((mean - test.targets) ** 2).mean((1, 2))
        base_err = ((base - test.targets) ** 2).mean((1, 2))
        mse.append(float(err.mean()))
        nn_mse.append(float(base_err.mean()))
        coverage.append(float(((mean - test.targets).abs() <= 2 * sigma).double().mean()))
        counts = test.inputs[2].sum(1)
        by_count.append({int(c): (float(err[counts == c].mean()), float(base_err[counts == c].mean()))
                         for c in counts.unique()})
    findings = [
        finding("decoder_beats_nearest_point",
                f"the decoder's test squared error is below the nearest context point's ({span(mse)} against "
                f"{span(nn_mse)})", [a < b for a, b in zip(mse, nn_mse)]),
        finding("calibrated_band",
                f"{span([100 * c for c in coverage], '.1f')}% of true values lie inside mean ± 2 sigma "
                "(between 85% and 99.5%; 95% for a calibrated Gaussian)", [0.85 <= c <= 0.995 for c in coverage]),
    ]
    notes = [f"learning rate {tuned.best_lr:g}{' (at the grid edge)' if tuned.at_edge else ''}; validation NLL "
             f"{span(tuned.scores[tuned.best_lr])}; {functions} functions, {steps} steps"]
    numbers: dict[str, Any] = {"functions": functions, "steps": steps, "tuning": tuned_dict(tuned),
                               "test_mse": mse, "nearest_point_mse": nn_mse, "coverage_2sigma": coverage,
                               "mse_by_context_points": by_count}

    fig, (ax1, ax2) = new_figure(2, width=4.8, height=3.6)
    test, model = runs[0]["test"], runs[0]["model"]
    i = 0  # the first test function
    cl, cv, cm, ql = (t[i : i + 1] for t in test.inputs)
    grid = torch.linspace(-2, 2, 200)[None, :, None]
    with torch.no_grad():
        mean, sigma = _gaussian(model(cl, cv, cm, grid))
    g, mu, sd = grid[0, :, 0], mean[0, :, 0], sigma[0, :, 0]
    ax1.fill_between(g.tolist(), (mu - 2 * sd).tolist(), (mu + 2 * sd).tolist(), color=PALETTE[0], alpha=0.25,
                     label="mean ± 2σ")
    ax1.plot(g.tolist(), mu.tolist(), color=PALETTE[0], label="predicted mean")
    real = cm[0].bool()
    ax1.plot(cl[0, real, 0].tolist(), cv[0, real, 0].tolist(), "o", color="black", markersize=4, label="context")
    ax1.plot(ql[0, :, 0].tolist(), test.targets[i, :, 0].tolist(), "x", color=PALETTE[1],
             label="true values at queries")
    ax1.set(xlabel="x", ylabel="f(x)", title=f"a test function, seed {seeds[0]}")
    ax1.legend(fontsize=7)
    counts = sorted(by_count[0])
    for j, (label, color) in enumerate((("PointSetDecoder", PALETTE[0]), ("nearest context point", PALETTE[1]))):
        rows = [[bc.get(c, (math.nan, math.nan))[j] for c in counts] for bc in by_count]
        mean_row = [sum(r[k] for r in rows) / len(rows) for k in range(len(counts))]
        ax2.plot(counts, mean_row, marker="o", markersize=3, color=color, label=label)
        ax2.fill_between(counts, [min(r[k] for r in rows) for k in range(len(counts))],
                         [max(r[k] for r in rows) for k in range(len(counts))], color=color, alpha=0.2, linewidth=0)
    ax2.set(yscale="log", xlabel="context points", ylabel="test squared error (mean over queries)",
            title="error against the number of context points")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    for d in tuned.details.values():
        for r in d:
            r.pop("model", None)
            r.pop("test", None)
    return Outcome(numbers, fig, findings, notes)
