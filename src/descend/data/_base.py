"""The containers every dataset in descend is returned as.

A dataset is supervised: ``model(*split.inputs) ≈ split.targets``. Tabular data has one input
``X [M, F]``; point sets have ``(locations [M, N, d_loc], values [M, N, d_val], mask [M, N])``;
query tasks (the 1-D regression sets) add ``query_locations [M, Q, d_loc]`` and predict
``targets [M, Q, d_val]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Task = Literal["classification", "regression"]
InputKind = Literal["vector", "pointset", "pointset-query", "tokens"]


@dataclass
class Split:
    """One split of a dataset: ``inputs`` (tensors sharing their first dimension M) and ``targets [M, ...]``."""

    inputs: tuple[Tensor, ...]
    targets: Tensor

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in self.inputs} | {self.targets.shape[0]}
        if len(sizes) != 1:
            raise ValueError(f"all inputs and targets must share their first dimension, got sizes {sorted(sizes)}")

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, index: Tensor | slice) -> Split:
        """The examples at ``index`` (a slice or a 1-D index tensor)."""
        return Split(tuple(t[index] for t in self.inputs), self.targets[index])

    def to(self, device: torch.device | str) -> Split:
        return Split(tuple(t.to(device) for t in self.inputs), self.targets.to(device))


@dataclass
class DataBundle:
    """A dataset split three ways, with what a model needs to know to fit it.

    ``in_features`` is set for ``input_kind == "vector"``; ``location_dim`` and ``value_dim`` for
    point sets. ``out_features`` is the number of classes (classification) or of regression outputs.
    """

    name: str
    task: Task
    input_kind: InputKind
    train: Split
    val: Split
    test: Split
    out_features: int
    in_features: int | None = None
    location_dim: int | None = None
    value_dim: int | None = None
    info: dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        return self.out_features if self.task == "classification" else None


def seeded_split(n: int, fractions: tuple[float, float], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``range(n)`` in a seeded random order, cut into three index tensors ``(first, second, rest)``.

    The order is ``torch.randperm(n)`` drawn from a generator seeded with ``seed``
    (:func:`descend._random.generator`); ``first`` is its leading ``round(fractions[0] * n)`` indices,
    ``second`` the next ``round(fractions[1] * n)`` (each at least one when its fraction is positive)
    and ``rest`` the remainder. Every loader splits its examples with it, naming the pieces it cuts
    first. Raises ``ValueError`` when nothing is left for ``rest``.
    """
    from descend._random import generator

    counts = [max(round(f * n), int(f > 0)) for f in fractions]
    if sum(counts) >= n:
        raise ValueError(f"{n} examples leave nothing after splits of {counts[0]} and {counts[1]}")
    order = torch.randperm(n, generator=generator(seed))
    return order[: counts[0]], order[counts[0] : sum(counts)], order[sum(counts) :]
