"""Function approximation: fitting an unknown 1-D and 2-D function with linear models and MLPs."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from descend import optim
from descend._random import generator, seed_everything
from descend.experiments._common import PALETTE, Outcome, band, finding, new_figure, span, tune, tuned_dict
from descend.nn import MLP

WIDTH, DEPTH = 32, 2
WIDTHS = (2, 8, 32, 128)
DEPTHS = (1, 2, 3)
GRID = (3e-3, 1e-2, 3e-2)
TRAIN, VAL = 256, 256


def f1(x: Tensor) -> Tensor:
    """The 1-D target on ``[-2, 2]``: ``sin(3x) + 0.3 x^2``. ``[N, 1] -> [N, 1]``."""
    return torch.sin(3 * x) + 0.3 * x**2


def f2(x: Tensor) -> Tensor:
    """The 2-D target on ``[-1.5, 1.5]^2``: ``sin(2 x_1) cos(2 x_2)``. ``[N, 2] -> [N, 1]``."""
    return (torch.sin(2 * x[:, :1]) * torch.cos(2 * x[:, 1:]))


class LinearChain(nn.Module):
    """An MLP without activations: ``depth + 1`` affine maps in a row, ``[B, in] -> [B, out]``.

    Their composition is one affine map, so it can represent nothing a single linear layer cannot.
    """

    def __init__(self, in_features: int, out_features: int, width: int = WIDTH, depth: int = DEPTH) -> None:
        super().__init__()
        sizes = [in_features] + [width] * depth + [out_features]
        self.layers = nn.Sequential(*(nn.Linear(a, b) for a, b in itertools.pairwise(sizes)))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "linear": lambda d, w, k: nn.Linear(d, 1),
    "MLP, no activation": lambda d, w, k: LinearChain(d, 1, w, k),
    "ReLU MLP": lambda d, w, k: MLP(d, 1, w, k, "relu"),
    "sigmoid MLP": lambda d, w, k: MLP(d, 1, w, k, "sigmoid"),
    "tanh MLP": lambda d, w, k: MLP(d, 1, w, k, "tanh"),
}


def _task(dim: int, seed: int) -> tuple[Tensor, ...]:
    """Training and validation inputs drawn uniformly (per seed), and a fixed dense test grid, with targets.

    The validation points choose the learning rates; the test grid is used for nothing but the reported error.
    """
    g = generator(seed)
    if dim == 1:
        x, xv = 4 * torch.rand(TRAIN, 1, generator=g) - 2, 4 * torch.rand(VAL, 1, generator=g) - 2
        xt = torch.linspace(-2, 2, 1000)[:, None]
        f = f1
    else:
        x, xv = 3 * torch.rand(4 * TRAIN, 2, generator=g) - 1.5, 3 * torch.rand(VAL, 2, generator=g) - 1.5
        grid = torch.linspace(-1.5, 1.5, 50)
        xt = torch.cartesian_prod(grid, grid)
        f = f2
    return x, f(x), xv, f(xv), xt, f(xt)


def _fit(model_name: str, dim: int, lr: float, seed: int, steps: int, width: int = WIDTH,
         depth: int = DEPTH) -> tuple[float, dict[str, Any]]:
    """Full-batch Adam on the mean squared error; validation MSE, and the test MSE and predictions."""
    x, y, xv, yv, xt, yt = _task(dim, seed)
    seed_everything(seed)
    model = MODELS[model_name](dim, width, depth)
    opt = optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        val, pred = float(nn.functional.mse_loss(model(xv), yv)), model(xt)
        test = float(nn.functional.mse_loss(pred, yt))
    if not math.isfinite(val):
        return math.inf, {}
    return val, {"test_mse": test, "prediction": pred[:, 0]}


def function_approximation(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """Linear models, and MLPs without activations, cannot fit a curved function; MLPs with ReLU, sigmoid or tanh can.

    The unknown functions are ``sin(3x) + 0.3 x^2`` on ``[-2, 2]`` (256 training points) and
    ``sin(2 x_1) cos(2 x_2)`` on ``[-1.5, 1.5]^2`` (1024 points), drawn uniformly per seed and fitted
    by full-batch Adam on the mean squared error. Models: a linear map, an MLP of two hidden layers of
    32 without activations (a product of affine maps: still affine), and the same MLP with ReLU, sigmoid
    or tanh. Every model's learning rate is tuned separately for each task, width and depth on the mean
    validation MSE over seeds (256 validation points drawn apart from the training ones; a grid extended
    at its edges); the test error is on a dense grid used for nothing else. Then the ReLU MLP's test
    error against the width (two hidden layers) and the depth (width 16).
    """
    steps = 300 if quick else 800
    n = len(seeds)

    def tuned_fit(m: str, dim: int, width: int = WIDTH, depth: int = DEPTH) -> Any:
        return tune(lambda lr, s: _fit(m, dim, lr, s, steps, width, depth), list(GRID), seeds, 2)

    tuned = {m: tuned_fit(m, 1) for m in MODELS}
    tuned2 = {m: tuned_fit(m, 2) for m in MODELS}
    test1 = {m: [d["test_mse"] for d in r.details[r.best_lr]] for m, r in tuned.items()}
    fits1 = {m: r.details[r.best_lr][0]["prediction"] for m, r in tuned.items()}
    runs2 = {m: r.details[r.best_lr] for m, r in tuned2.items()}
    test2 = {m: [d["test_mse"] for d in runs] for m, runs in runs2.items()}
    widths = WIDTHS[:-1] if quick else WIDTHS
    relu = "ReLU MLP"
    width_tuning = {w: tuned["ReLU MLP"] if (w, DEPTH) == (WIDTH, DEPTH) else tuned_fit(relu, 1, width=w)
                    for w in widths}
    depth_tuning = {k: tuned_fit(relu, 1, width=16, depth=k) for k in DEPTHS}
    by_width = {w: [d["test_mse"] for d in r.details[r.best_lr]] for w, r in width_tuning.items()}
    by_depth = {k: [d["test_mse"] for d in r.details[r.best_lr]] for k, r in depth_tuning.items()}

    findings = [
        finding("no_activation_is_linear",
                f"the MLP without activations fits no better than the linear model (1-D test MSE "
                f"{span(test1['MLP, no activation'])} against {span(test1['linear'])}; 2-D "
                f"{span(test2['MLP, no activation'])} against {span(test2['linear'])}): within 2% or worse",
                [test1["MLP, no activation"][i] >= 0.98 * test1["linear"][i]
                 and test2["MLP, no activation"][i] >= 0.98 * test2["linear"][i] for i in range(n)]),
        finding("activations_fit",
                "ReLU, sigmoid and tanh MLPs all fit both functions over 10x better than the linear model "
                f"(1-D: ReLU {span(test1['ReLU MLP'])}, tanh {span(test1['tanh MLP'])}, "
                f"sigmoid {span(test1['sigmoid MLP'])})",
                [all(t[m][i] < t["linear"][i] / 10 for t in (test1, test2)
                     for m in ("ReLU MLP", "sigmoid MLP", "tanh MLP")) for i in range(n)]),
        finding("wider_is_better",
                f"a wider ReLU MLP fits better: width {widths[-1]} {span(by_width[widths[-1]])} against "
                f"width {widths[0]} {span(by_width[widths[0]])}",
                [a < b for a, b in zip(by_width[widths[-1]], by_width[widths[0]])]),
        finding("deeper_is_better",
                f"at width 16, three hidden ReLU layers fit better than one ({span(by_depth[3])} against "
                f"{span(by_depth[1])})",
                [a < b for a, b in zip(by_depth[3], by_depth[1])]),
    ]
    edge = lambda r: " (at the grid edge)" if r.at_edge else ""  # noqa: E731
    notes = [f"{m}: lr 1-D {tuned[m].best_lr:g}{edge(tuned[m])}, 2-D {tuned2[m].best_lr:g}{edge(tuned2[m])}; "
             f"test MSE 1-D {span(test1[m])}, 2-D {span(test2[m])}" for m in MODELS]
    notes += [f"ReLU MLP, width {w}: lr {r.best_lr:g}{edge(r)}, 1-D test MSE {span(by_width[w])}"
              for w, r in width_tuning.items()]
    notes += [f"ReLU MLP, width 16, {k} hidden layers: lr {r.best_lr:g}{edge(r)}, 1-D test MSE {span(by_depth[k])}"
              for k, r in depth_tuning.items()]
    numbers: dict[str, Any] = {
        "steps": steps, "tuning_1d": {m: tuned_dict(r) for m, r in tuned.items()},
        "tuning_2d": {m: tuned_dict(r) for m, r in tuned2.items()},
        "tuning_by_width": {str(w): tuned_dict(r) for w, r in width_tuning.items()},
        "tuning_by_depth": {str(k): tuned_dict(r) for k, r in depth_tuning.items()},
        "test_mse_1d": test1, "test_mse_2d": test2,
        "test_mse_by_width": {str(w): v for w, v in by_width.items()},
        "test_mse_by_depth": {str(k): v for k, v in by_depth.items()},
    }

    fig, axes = new_figure(3, width=4.2, height=3.5, nrows=2)
    xt = torch.linspace(-2, 2, 1000)
    x, y = _task(1, seeds[0])[:2]
    axes[0].plot(x[:, 0].tolist(), y[:, 0].tolist(), ".", color="gray", markersize=3, label="training points")
    for (m, pred), color in zip(fits1.items(), PALETTE):
        axes[0].plot(xt.tolist(), pred.tolist(), color=color, linewidth=1.3,
                     linestyle="--" if m == "MLP, no activation" else "-", label=m)
    axes[0].set(xlabel="x", ylabel="y", title=f"sin(3x) + 0.3x², seed {seeds[0]}")
    axes[0].set_ylim(-1.3, 3.0)  # room for the legend above the curves
    axes[0].legend(fontsize=6, loc="upper center", ncol=2)
    grid = torch.linspace(-1.5, 1.5, 50)
    truth = f2(torch.cartesian_prod(grid, grid))[:, 0].reshape(50, 50)
    fit = runs2["ReLU MLP"][0]["prediction"].reshape(50, 50)
    for ax, z, title in ((axes[1], truth, "sin(2x₁)·cos(2x₂)"), (axes[2], fit, f"ReLU MLP fit, seed {seeds[0]}")):
        im = ax.imshow(z.T.numpy(), origin="lower", extent=(-1.5, 1.5, -1.5, 1.5), cmap="cividis", vmin=-1, vmax=1)
        ax.set(xlabel="x₁", ylabel="x₂", title=title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    names = list(MODELS)
    for j, (tests, label) in enumerate(((test1, "1-D"), (test2, "2-D"))):
        means = [sum(tests[m]) / n for m in names]
        axes[3].bar([i + 0.4 * j - 0.2 for i in range(len(names))], means, width=0.4, color=PALETTE[j], label=label,
                    yerr=[[mu - min(tests[m]) for mu, m in zip(means, names)],
                          [max(tests[m]) - mu for mu, m in zip(means, names)]], capsize=2)
    axes[3].set_xticks(range(len(names)), ["linear", "no act.", "ReLU", "sigmoid", "tanh"])
    axes[3].set(yscale="log", ylabel="test MSE (min-max over seeds)", title="two hidden layers of 32")
    axes[3].legend(fontsize=7)
    band(axes[4], widths, [[by_width[w][i] for w in widths] for i in range(n)], PALETTE[2], relu)
    axes[4].set(xscale="log", yscale="log", xlabel="width (two hidden layers)", ylabel="1-D test MSE",
                title="error against width, lr tuned per width")
    axes[4].set_xticks(list(widths), [str(w) for w in widths])
    axes[4].minorticks_off()
    axes[4].legend(fontsize=7)
    band(axes[5], DEPTHS, [[by_depth[k][i] for k in DEPTHS] for i in range(n)], PALETTE[2], relu)
    axes[5].set(yscale="log", xlabel="hidden layers (width 16)", ylabel="1-D test MSE",
                title="error against depth, lr tuned per depth")
    axes[5].set_xticks(list(DEPTHS))
    axes[5].legend(fontsize=7)
    for ax in (axes[0], axes[3], axes[4], axes[5]):
        ax.grid(True, alpha=0.3)
    return Outcome(numbers, fig, findings, notes)
