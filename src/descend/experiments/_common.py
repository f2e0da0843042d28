"""What every experiment shares: its outcome, atomic file writing, the digits data and small loops."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

DPI = 100


@dataclass
class Outcome:
    """What an experiment returns: its numbers, its figure and its finding as a few printed lines."""

    numbers: dict[str, Any]
    figure: Figure
    finding: list[str] = field(default_factory=list)


def new_figure(ncols: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Any]]:
    """A matplotlib ``Figure`` (no pyplot, so no global state) with ``ncols`` axes side by side."""
    fig = Figure(figsize=(width * ncols, height), dpi=DPI)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG to a temporary file beside ``path``, then move it into place."""
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI), "wb")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def save_json(numbers: dict[str, Any], path: Path) -> None:
    """Write ``numbers`` as indented JSON, atomically (non-finite floats become strings)."""
    _atomic_write(path, lambda f: json.dump(_jsonable(numbers), f, indent=1), "w")


@lru_cache(maxsize=4)
def _digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from descend.data.tabular import load_digits

    bundle = load_digits(seed=seed)
    # train on the train split, report on val + test together (the experiments tune nothing on it)
    x_test = torch.cat([bundle.val.inputs[0], bundle.test.inputs[0]])
    y_test = torch.cat([bundle.val.targets, bundle.test.targets])
    return bundle.train.inputs[0], bundle.train.targets, x_test, y_test


def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardised digits ``(x_train [1078, 64], y_train [1078], x_test [719, 64], y_test [719])``."""
    return _digits(seed)


def seed_all(seed: int) -> torch.Generator:
    """Seed torch's global generator and return a fresh generator for the data order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches: a fresh permutation of ``range(n)`` each epoch, cut into ``batch_size``."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def flat(tensors: list[Tensor]) -> Tensor:
    """All tensors concatenated into one 1-D float64 vector."""
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean cross-entropy of ``model`` on ``(x, y)``, without gradients."""
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def accuracy(model: nn.Module, inputs: tuple[Tensor, ...], y: Tensor) -> float:
    """Share of ``y`` that ``model(*inputs)`` classifies correctly, without gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(*inputs).argmax(-1) == y).double().mean())
    model.train(was_training)
    return acc
