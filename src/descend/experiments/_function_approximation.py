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
WIDTHS = (2, 4, 8, 32, 128)
DEPTHS = (1, 2, 3, 4)
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
    """Training and validation inputs drawn uniformly (per seed), and a fixed dense test grid, with targets."""
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
    or tanh. Each model's learning rate is tuned on the mean validation MSE over seeds of the 1-D task
    (grid extended at its edges) and reused for the 2-D task and the sweeps; the test error is on a dense
    grid. Then the test error against the width (two hidden layers) and the depth (width 16).
    """
    steps = 300 if quick else 800
    n = len(seeds)
    tuned = {m: tune(lambda lr, s, m=m: _fit(m, 1, lr, s, steps), [3e-3, 1e-2, 3e-2], seeds, 3) for m in MODELS}
    lr = {m: r.best_lr for m, r in tuned.items()}
    test1 = {m: [d["test_mse"] for d in r.details[r.best_lr]] for m, r in tuned.items()}
    fits1 = {m: r.details[r.best_lr][0]["prediction"] for m, r in tuned.items()}
    runs2 = {m: [_fit(m, 2, lr[m], s, steps)[1] for s in seeds] for m in MODELS}
    test2 = {m: [d["test_mse"] for d in runs] for m, runs in runs2.items()}
    widths = WIDTHS[:-1] if quick else WIDTHS
    by_width = {m: {w: [_fit(m, 1, lr[m], s, steps, width=w)[1]["test_mse"] for s in seeds] for w in widths}
                for m in ("ReLU MLP", "tanh MLP")}
    by_depth = {m: {k: [_fit(m, 1, lr[m], s, steps, width=16, depth=k)[1]["test_mse"] for s in seeds]
                    for k in DEPTHS} for m in ("ReLU MLP", "tanh MLP")}

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
                f"a wider ReLU MLP fits better: width {widths[-1]} {span(by_width['ReLU MLP'][widths[-1]])} against "
                f"width {widths[0]} {span(by_width['ReLU MLP'][widths[0]])}",
                [a < b for a, b in zip(by_width["ReLU MLP"][widths[-1]], by_width["ReLU MLP"][widths[0]])]),
        finding("deeper_is_better",
                f"at width 16, three hidden ReLU layers fit better than one ({span(by_depth['ReLU MLP'][3])} against "
                f"{span(by_depth['ReLU MLP'][1])})",
                [a < b for a, b in zip(by_depth["ReLU MLP"][3], by_depth["ReLU MLP"][1])]),
    ]
    notes = [f"{m}: lr {lr[m]:g}{' (at the grid edge)' if tuned[m].at_edge else ''}, test MSE 1-D {span(test1[m])}, "
             f"2-D {span(test2[m])}" for m in MODELS]
    numbers: dict[str, Any] = {
        "steps": steps, "tuning": {m: tuned_dict(r) for m, r in tuned.items()},
        "test_mse_1d": test1, "test_mse_2d": test2,
        "test_mse_by_width": {m: {str(w): v for w, v in d.items()} for m, d in by_width.items()},
        "test_mse_by_depth": {m: {str(k): v for k, v in d.items()} for m, d in by_depth.items()},
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
    for (m, d), color in zip(by_width.items(), PALETTE):
        band(axes[4], widths, [[d[w][i] for w in widths] for i in range(n)], color, m)
    axes[4].set(xscale="log", yscale="log", xlabel="width (two hidden layers)", ylabel="1-D test MSE",
                title="error against width")
    axes[4].set_xticks(list(widths), [str(w) for w in widths])
    axes[4].minorticks_off()
    axes[4].legend(fontsize=7)
    for (m, d), color in zip(by_depth.items(), PALETTE):
        band(axes[5], DEPTHS, [[d[k][i] for k in DEPTHS] for i in range(n)], color, m)
    axes[5].set(yscale="log", xlabel="hidden layers (width 16)", ylabel="1-D test MSE", title="error against depth")
    axes[5].set_xticks(list(DEPTHS))
    axes[5].legend(fontsize=7)
    for ax in (axes[0], axes[3], axes[4], axes[5]):
        ax.grid(True, alpha=0.3)
    return Outcome(numbers, fig, findings, notes)
