"""Digits as sets of (location: value) points: trained in raster order, tested on shuffled and thinned sets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from descend import optim
from descend._random import generator, seed_everything
from descend.data._base import Split
from descend.experiments._common import PALETTE, Outcome, accuracy, finding, new_figure, span, tune, tuned_dict
from descend.nn import MLP, PointSetTransformer
from descend.train import Minibatch

KEEP = (0.25, 0.5, 0.75, 1.0)


class FlatPoints(nn.Module):
    """An MLP on the points as one flat vector, in the order given: ``[B, N, 2], [B, N, 1], [B, N] -> [B, 10]``.

    Point ``i`` fills inputs ``3i .. 3i+2`` with ``(location, value)``; padding is zeros.
    """

    def __init__(self, points: int, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = MLP(3 * points, 10, hidden, 2)

    def forward(self, locations: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        x = torch.cat([locations, values], dim=-1) * mask[..., None]  # (B, N, 3)
        return self.mlp(x.flatten(1))


def _reorder(split: Split, seed: int, keep: float = 1.0, shuffle: bool = True) -> Split:
    """A random share ``keep`` of each set's real points, in a fresh random order (``shuffle``) or in their
    original order; the dropped points and the padding go last, masked out."""
    locations, values, mask = split.inputs
    g = generator(seed)
    key = torch.rand(mask.shape, generator=g)
    count = mask.sum(1, keepdim=True)
    rank = key.masked_fill(~mask.bool(), 2.0).argsort(1).argsort(1)
    kept = mask.bool() & (rank < torch.ceil(keep * count))
    order = key if shuffle else torch.linspace(0, 1, mask.shape[1]).expand_as(key)
    key = torch.where(kept, order, order + 10.0)  # kept points first
    idx = key.argsort(1)
    take = lambda t: torch.gather(t, 1, idx[..., None].expand_as(t)) if t.dim() == 3 else torch.gather(t, 1, idx)  # noqa: E731
    return Split((take(locations), take(values), take(kept.to(mask.dtype))), split.targets)


def _fit(model: nn.Module, train: Split, epochs: int, lr: float, seed: int) -> None:
    """Adam, minibatches of 64, learning rate cosine-decayed to zero over ``epochs``."""
    opt = optim.Adam(model.parameters(), lr=lr)
    sampler = Minibatch(len(train), 64, seed=seed)
    total = epochs * sampler.steps_per_epoch
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        (idx,) = sampler.next_step()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(*(t[idx] for t in train.inputs)), train.targets[idx]).backward()
        opt.step()


def point_sets(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """Trained on points in raster order, attention keeps its accuracy on shuffled points; a flat MLP's collapses.

    :func:`descend.data.points.load_digits_points` turns each 8x8 digit into its non-blank pixels,
    ``(location in [-1, 1]^2 : intensity)``, listed row by row (raster order). A
    :class:`descend.nn.PointSetTransformer` (width 32, one self-attention block, 4 heads) and an MLP on
    the flat vector of the points in the order given (3 numbers per point, 2 hidden layers of 128) are
    trained on the raster-ordered training digits by Adam (minibatches of 64, cosine decay), each at the
    learning rate with the lowest mean final validation loss (raster order) over the seeds, on a grid
    extended while its best is at an edge. Both are tested on the same test digits in raster order,
    with each set's points shuffled, and with only a random 25%..75% of each set's points kept, in
    raster order (the number of points varies).
    """
    from descend.data.points import load_digits_points

    epochs = 6 if quick else 12
    n = len(seeds)
    acc: dict[str, dict[str, list[float]]] = {"attention": {}, "flat MLP": {}}
    bundles = {s: load_digits_points(seed=s, order="raster") for s in seeds}
    models = {
        "attention": lambda points: PointSetTransformer(2, 1, 10, width=32, depth=1, heads=4),
        "flat MLP": lambda points: FlatPoints(points),
    }
    tuning: dict[str, Any] = {}
    for label, make in models.items():

        def run(lr: float, s: int, make: Any = make) -> tuple[float, dict[str, float]]:
            bundle = bundles[s]
            test = bundle.test
            tests = {"raster": test, "shuffled": _reorder(test, s)}
            tests.update({f"keep {k:g}": _reorder(test, s + 100, k, shuffle=False) for k in KEEP if k < 1})
            seed_everything(s)
            model = make(bundle.train.inputs[0].shape[1])
            _fit(model, bundle.train, epochs, lr, s)
            model.eval()
            with torch.no_grad():
                val = float(nn.functional.cross_entropy(model(*bundle.val.inputs), bundle.val.targets))
            return val, {name: accuracy(model, split.inputs, split.targets) for name, split in tests.items()}

        result = tune(run, [1e-3, 3e-3, 1e-2], seeds)
        tuning[label] = tuned_dict(result)
        for per_seed in result.details[result.best_lr]:
            for name, value in per_seed.items():
                acc[label].setdefault(name, []).append(value)
    drop = {m: [100 * (a - b) for a, b in zip(acc[m]["raster"], acc[m]["shuffled"])] for m in acc}
    findings = [
        finding("attention_order_free",
                f"shuffling the test points changes attention's accuracy by under 1 point "
                f"(raster {span(acc['attention']['raster'])}, shuffled {span(acc['attention']['shuffled'])})",
                [abs(d) < 1.0 for d in drop["attention"]]),
        finding("mlp_drops_on_shuffle",
                f"the flat MLP drops by over 30 points on shuffled points (raster {span(acc['flat MLP']['raster'])}, "
                f"shuffled {span(acc['flat MLP']['shuffled'])}; chance is 0.1)",
                [d > 30 for d in drop["flat MLP"]]),
        finding("attention_with_half_the_points",
                f"with half of each set's points kept, attention beats the flat MLP "
                f"({span(acc['attention']['keep 0.5'])} against {span(acc['flat MLP']['keep 0.5'])})",
                [a > b for a, b in zip(acc["attention"]["keep 0.5"], acc["flat MLP"]["keep 0.5"])]),
    ]
    notes = [f"{m}, test on {name}: accuracy {span(v)}" for m, by in acc.items() for name, v in by.items()]
    notes += [f"{m}: tuned lr {t['best_lr']:g}" + (" (at the grid's edge)" if t["at_edge"] else "")
              for m, t in tuning.items()]
    numbers: dict[str, Any] = {"epochs": epochs, "accuracy": acc, "drop_points": drop, "tuning": tuning}

    fig, (ax1, ax2) = new_figure(2, width=4.6, height=3.6)
    names = ["raster", "shuffled"]
    for j, (m, color) in enumerate(zip(acc, PALETTE)):
        means = [sum(acc[m][k]) / n for k in names]
        ax1.bar([i + 0.4 * j - 0.2 for i in range(2)], means, width=0.4, color=color, label=m,
                yerr=[[mu - min(acc[m][k]) for mu, k in zip(means, names)],
                      [max(acc[m][k]) - mu for mu, k in zip(means, names)]], capsize=3)
    ax1.axhline(0.1, color="gray", linestyle=":", linewidth=1, label="chance")
    ax1.set_xticks([0, 1], ["test: raster order", "test: shuffled points"])
    ax1.set(ylabel="test accuracy (min-max over seeds)", ylim=(0, 1.2), title="trained on raster order")
    ax1.legend(fontsize=7, loc="upper center", ncol=3)
    for m, color in zip(acc, PALETTE):
        rows = [[acc[m][f"keep {k:g}" if k < 1 else "raster"][i] for k in KEEP] for i in range(n)]
        mean = [sum(r[j] for r in rows) / n for j in range(len(KEEP))]
        ax2.errorbar([100 * k for k in KEEP], mean, yerr=[[mu - min(r[j] for r in rows) for j, mu in enumerate(mean)],
                                                      [max(r[j] for r in rows) - mu for j, mu in enumerate(mean)]],
                     marker="o", capsize=3, color=color, label=m)
    ax2.set(xlabel="% of each digit's points kept (random subset, raster order)", ylabel="test accuracy",
            ylim=(0, 1.05),
            title="fewer points than in training")
    ax2.legend(fontsize=7, loc="lower right")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    return Outcome(numbers, fig, findings, notes)
