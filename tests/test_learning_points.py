"""Real training runs on the point-set data, with descend's own optimizer (slow: ``make test-slow``).

Each run trains for a fixed number of epochs or ``BUDGET_S`` seconds, whichever ends first, so the
test stays under 3 minutes on a busy 2-core machine; the accuracy / error bar is then asserted.
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
from descend.optim import AdamW

BUDGET_S = 120.0
pytestmark = pytest.mark.slow


def _train(model: nn.Module, bundle: DataBundle, epochs: int, lr: float, batch_size: int = 64) -> float:
    """AdamW, linear warm-up then cosine decay over ``epochs`` or ``BUDGET_S`` seconds, whichever ends
    first (progress = max(step fraction, time fraction)), so a busy machine shortens the run but the
    schedule still anneals. Returns the training wall time in seconds."""
    torch.set_num_threads(2)
    loss_fn = F.cross_entropy if bundle.task == "classification" else F.mse_loss
    opt = AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(bundle.train)
    steps = epochs * math.ceil(n / batch_size)
    g = torch.Generator().manual_seed(0)
    start, step, progress = time.perf_counter(), 0, 0.0
    model.train()
    while progress < 1.0:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            progress = max(step / steps, (time.perf_counter() - start) / BUDGET_S)
            if progress >= 1.0:
                break
            batch = bundle.train.subset(perm[i : i + batch_size])
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
            opt.zero_grad()
            loss_fn(model(*batch.inputs), batch.targets).backward()
            opt.step()
            step += 1
    model.eval()
    return time.perf_counter() - start


def _predict(model: nn.Module, split: Split) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*split.subset(slice(i, i + 256)).inputs) for i in range(0, len(split), 256)])


def _accuracy(model: nn.Module, split: Split) -> float:
    return float((_predict(model, split).argmax(-1) == split.targets).float().mean())


def test_set_transformer_classifies_digits_as_points() -> None:
    torch.manual_seed(0)
    bundle = load_digits_points(seed=0)
    model = PointSetTransformer(2, 1, 10, width=64, depth=2, heads=4)
    seconds = _train(model, bundle, epochs=40, lr=3e-3)
    acc = _accuracy(model, bundle.test)
    print(f"digits-points: test accuracy {acc:.4f} in {seconds:.1f}s")
    assert acc >= 0.95
    assert seconds < 180


def test_set_transformer_classifies_shapes() -> None:
    torch.manual_seed(0)
    bundle = make_shapes(seed=0)
    model = PointSetTransformer(3, 1, 5, width=64, depth=2, heads=4, inducing_points=16)
    seconds = _train(model, bundle, epochs=30, lr=3e-3)
    acc = _accuracy(model, bundle.test)
    print(f"shapes: test accuracy {acc:.4f} in {seconds:.1f}s")
    assert acc >= 0.95
    assert seconds < 180


def test_decoder_beats_nearest_neighbour_on_gp_regression() -> None:
    torch.manual_seed(0)
    bundle = make_gp1d(seed=0)
    model = PointSetDecoder(1, 1, 1, width=64, depth=2, heads=4)
    seconds = _train(model, bundle, epochs=40, lr=3e-3)
    mse = float(F.mse_loss(_predict(model, bundle.test), bundle.test.targets))
    baseline = float(F.mse_loss(nearest_context_value(*bundle.test.inputs), bundle.test.targets))
    print(f"gp1d: decoder test MSE {mse:.4f} vs nearest-neighbour {baseline:.4f} in {seconds:.1f}s")
    assert mse < 0.8 * baseline
    assert seconds < 180
