"""Real training runs on the point-set data, with descend's own optimizer (slow: ``make test-slow``).

Every run is bounded by a fixed number of epochs, never by the clock, so the result does not depend
on how busy the machine is; the wall and CPU seconds are printed (figures in the README, "Networks").

The optimizer is ``descend.optim.Adam(engine="reference")`` with no weight decay, which every engine
computes exactly as ``torch.optim.Adam`` does (the figures were first measured while the engines
skipped decoupled decay; none of these runs needs decay).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from descend.data import DataBundle, Split, load_digits_points, make_gp1d, make_shapes, nearest_context_value
from descend.nn import PointSetDecoder, PointSetTransformer
from descend.optim import Adam

pytestmark = pytest.mark.slow


def _train(
    model: nn.Module, bundle: DataBundle, epochs: int, lr: float, batch_size: int = 64, warmup: int = 50
) -> tuple[float, float]:
    """Adam for ``epochs`` epochs: linear warm-up over ``warmup`` steps, then cosine decay to zero.

    Returns ``(wall seconds, CPU seconds of this process)``.
    """
    torch.set_num_threads(2)
    loss_fn = F.cross_entropy if bundle.task == "classification" else F.mse_loss
    opt = Adam(model.parameters(), lr=lr, engine="reference")
    n = len(bundle.train)
    steps = epochs * math.ceil(n / batch_size)
    g = torch.Generator().manual_seed(0)
    wall, cpu, step = time.perf_counter(), time.process_time(), 0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            batch = bundle.train.subset(perm[i : i + batch_size])
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            opt.zero_grad()
            loss_fn(model(*batch.inputs), batch.targets).backward()
            opt.step()
            step += 1
    model.eval()
    return time.perf_counter() - wall, time.process_time() - cpu


def _predict(model: nn.Module, split: Split) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*split.subset(slice(i, i + 256)).inputs) for i in range(0, len(split), 256)])


def _accuracy(model: nn.Module, split: Split) -> float:
    return float((_predict(model, split).argmax(-1) == split.targets).float().mean())


def test_set_transformer_classifies_digits_as_points() -> None:
    torch.manual_seed(0)
    bundle = load_digits_points(seed=0)
    model = PointSetTransformer(2, 1, 10)
    wall, cpu = _train(model, bundle, epochs=EPOCHS["digits"], lr=3e-3)
    acc = _accuracy(model, bundle.test)
    print(f"digits-points: test accuracy {acc:.4f}, {EPOCHS['digits']} epochs, {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert acc >= 0.95


def test_set_transformer_classifies_shapes() -> None:
    torch.manual_seed(0)
    # pose and size are drawn at random, then normalised away (principal axes, unit RMS radius) as the
    # position is by centring; the value channel is then the scale-free distance to the centroid
    bundle = make_shapes(n_per_class=600, points=(64, 160), pose="principal", normalise=True, seed=0)
    model = PointSetTransformer(3, 1, 5, inducing_points=16)
    wall, cpu = _train(model, bundle, epochs=EPOCHS["shapes"], lr=2e-3, batch_size=32)
    acc = _accuracy(model, bundle.test)
    print(f"shapes: test accuracy {acc:.4f}, {EPOCHS['shapes']} epochs, {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert acc >= 0.95


def test_decoder_beats_nearest_neighbour_on_gp_regression() -> None:
    torch.manual_seed(0)
    bundle = make_gp1d(n_functions=12_000, seed=0)
    model = PointSetDecoder(1, 1, 1)
    wall, cpu = _train(model, bundle, epochs=EPOCHS["gp1d"], lr=2e-3)
    mse = float(F.mse_loss(_predict(model, bundle.test), bundle.test.targets))
    baseline = float(F.mse_loss(nearest_context_value(*bundle.test.inputs), bundle.test.targets))
    print(
        f"gp1d: decoder test MSE {mse:.4f} vs nearest-neighbour {baseline:.4f} ({mse / baseline:.2f}x), "
        f"{EPOCHS['gp1d']} epochs, {wall:.1f} s wall, {cpu:.1f} s CPU"
    )
    assert mse <= 0.8 * baseline


EPOCHS = {"digits": 30, "shapes": 10, "gp1d": 8}
