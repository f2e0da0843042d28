"""Digits as sets of (location: value) points: attention does not care about the order, a flat MLP does."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from descend import optim
from descend.data._base import Split
from descend.experiments._common import Outcome, accuracy, minibatches, new_figure, seed_all
from descend.nn import MLP, PointSetTransformer


class FlatPoints(nn.Module):
    """An MLP on the points as one flat vector, in the order given: ``[B, N, 2], [B, N, 1], [B, N] -> [B, 10]``.

    Point ``i`` fills inputs ``3i .. 3i+2`` with ``(location, value)``; padding is zeros.
    """

    def __init__(self, points: int, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = MLP(3 * points, 10, hidden=hidden, depth=2)

    def forward(self, locations: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        x = torch.cat([locations, values], dim=-1) * mask[..., None]  # (B, N, 3)
        return self.mlp(x.flatten(1))


def _fit(model: nn.Module, train: Split, test: Split, epochs: int, lr: float, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed + 1)
    opt = optim.Adam(model.parameters(), lr=lr)
    n = len(train)
    batches = minibatches(n, 64, gen)
    curve = []
    total, step = epochs * (n // 64), 0
    for _ in range(epochs):
        for _ in range(n // 64):
            # cosine decay to zero, so the final accuracy is not one noisy epoch's
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            step += 1
            idx = next(batches)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(*(t[idx] for t in train.inputs)), train.targets[idx]).backward()
            opt.step()
        curve.append(accuracy(model, test.inputs, test.targets))
    return {"test_accuracy": curve[-1], "curve": curve,
            "train_accuracy": accuracy(model, train.inputs, train.targets)}


def point_sets(*, quick: bool = False, seed: int = 0) -> Outcome:
    """With the points in a random order the attention model keeps its accuracy; the flat MLP's collapses.

    :func:`descend.data.points.load_digits_points` turns each 8x8 digit into its non-blank pixels,
    ``(location in [-1, 1]^2 : intensity)``, listed row by row (``"raster"``) or in a fresh random
    order per image (``"random"``), padded and masked. A :class:`descend.nn.PointSetTransformer`
    (width 32, one self-attention block, 4 heads, attention pooling) and an MLP on the flat vector of
    the points in the order given (3 numbers per point, 2 hidden layers of 128) are each trained by
    Adam (minibatches of 64, learning rate cosine-decayed to 0) on both orders, same split, same
    initialisation; reported: test accuracy on 540 digits.
    """
    from descend.data.points import load_digits_points

    epochs = 10 if quick else 20
    results: dict[str, dict[str, Any]] = {}
    for order in ("raster", "random"):
        bundle = load_digits_points(seed=seed, order=order)
        test = Split(tuple(torch.cat([a, b]) for a, b in zip(bundle.val.inputs, bundle.test.inputs)),
                     torch.cat([bundle.val.targets, bundle.test.targets]))
        points = bundle.train.inputs[0].shape[1]
        seed_all(seed)
        attention = PointSetTransformer(2, 1, 10, width=32, depth=1, heads=4)
        results[f"attention, {order}"] = _fit(attention, bundle.train, test, epochs, 3e-3, seed)
        seed_all(seed)
        results[f"flat MLP, {order}"] = _fit(FlatPoints(points), bundle.train, test, epochs, 1e-3, seed)
    acc = {label: r["test_accuracy"] for label, r in results.items()}
    numbers: dict[str, Any] = {
        "epochs": epochs, "train_examples": len(bundle.train), "test_examples": len(test),
        "test_accuracy": acc,
        "attention_drop_points": 100 * (acc["attention, raster"] - acc["attention, random"]),
        "flat_mlp_drop_points": 100 * (acc["flat MLP, raster"] - acc["flat MLP, random"]),
        "train_accuracy": {label: r["train_accuracy"] for label, r in results.items()},
        "curves": {label: r["curve"] for label, r in results.items()},
    }
    finding = [f"test accuracy after {epochs} epochs ({len(test)} test digits):"]
    finding += [f"  {label:>18}: {a:.3f}" for label, a in acc.items()]
    finding.append(f"random order costs attention {numbers['attention_drop_points']:+.1f} points, "
                   f"the flat MLP {numbers['flat_mlp_drop_points']:+.1f} points")

    fig, (ax1, ax2) = new_figure(2, width=4.4)
    for label, r in results.items():
        style = "-" if "raster" in label else "--"
        ax1.plot(range(1, epochs + 1), r["curve"], style, label=label)
    ax1.set(xlabel="epoch", ylabel="test accuracy", title="digits as (location: value) point sets", ylim=(0, 1))
    ax1.legend(fontsize=8)
    ax1.grid(True, alpha=0.3)
    labels = ["attention", "flat MLP"]
    ax2.bar([0 - 0.2, 1 - 0.2], [acc["attention, raster"], acc["flat MLP, raster"]], width=0.4, label="raster order")
    ax2.bar([0 + 0.2, 1 + 0.2], [acc["attention, random"], acc["flat MLP, random"]], width=0.4,
            label="random order per digit")
    ax2.set_xticks([0, 1], labels)
    ax2.set(ylabel="test accuracy", ylim=(0, 1), title="same points, different order")
    ax2.legend(fontsize=8, loc="lower left")
    ax2.grid(True, axis="y", alpha=0.3)
    return Outcome(numbers, fig, finding)
