"""What the trainer reads examples from: in-memory tensors, a map-style ``Dataset``, or a ``DataLoader``.

Every split becomes a :class:`Source` that turns what the sampler yields into ``(inputs, targets)``
on the CPU (``model(*inputs)`` is compared with ``targets``):

- a :class:`~descend.data.Split` (tensors): the sampler's index tensors or slices index them directly;
- a map-style ``torch.utils.data.Dataset``: the same samplers draw indices, and the items (each a
  tuple ``(input_1, ..., input_k, target)``) are collated with ``default_collate``;
- a ``DataLoader``: its batches *are* the micro-batches (``accumulation`` of them per step); the
  trainer's ``batch_size``, ``replacement`` and ``chunk_size`` do not apply, and under torchrun each
  rank iterates its own loader (give it a ``DistributedSampler``; every rank must get as many batches).

At ``W`` processes, index batches are global: each rank keeps its share (:func:`descend.distributed.shard`,
the identity at ``W = 1``), and the step's example count ``M`` is known on every rank without
communication. A loader's batches are already each rank's own; ``M`` is then their sum over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from descend import distributed as dd
from descend.data._base import DataBundle, Split
from descend.train._sampling import Batch

__all__ = ["DataSource", "LoaderSource", "Source", "TensorSource", "as_sources", "infer_task"]

Example = tuple[tuple[Tensor, ...], Tensor]
SPLITS = ("train", "val", "test")


def size(batch: Batch, n: int) -> int:
    """Examples in an index tensor or a slice of ``range(n)``."""
    return len(range(*batch.indices(n))) if isinstance(batch, slice) else int(batch.shape[0])


class Source:
    """Base: ``n`` examples (``None``: a loader), ``local(batch)`` this rank's ``(inputs, targets)``."""

    n: int | None

    def take(self, batch: Any) -> Example:
        raise NotImplementedError

    def local(self, batch: Any, world: int | None = None) -> Example:
        """This rank's share of ``batch`` (of ``world`` ranks): the shard of an index batch, a loader batch as it is."""
        return self.take(dd.shard(batch, world_size=world))

    def total(self, batches: list[Any]) -> int:
        """``M``: the examples of one step over all ranks."""
        assert self.n is not None
        return sum([size(b, self.n) for b in batches])

    def local_count(self, batch: Any, world: int | None = None) -> int:
        """The examples of ``batch`` on this rank (their sum over ranks is ``batch``'s size)."""
        assert self.n is not None
        return size(dd.shard(batch, world_size=world), self.n)

    def eval_batches(self, chunk_size: int, limit: int | None = None) -> list[Any]:
        """This rank's evaluation pieces, as many on every rank (FSDP2 gathers in every forward).

        With ``limit < n``, the ``limit`` examples ``floor(i n / limit)``, ``i < limit``: evenly spaced
        over the split and the same at every evaluation.
        """
        assert self.n is not None
        if limit is not None and limit < self.n:
            count, everyone = limit, torch.arange(limit, dtype=torch.int64) * self.n // limit
        else:
            count, everyone = self.n, slice(0, self.n)
        mine = dd.shard(everyone)
        chunks = max(1, math.ceil(math.ceil(count / dd.world_size()) / chunk_size))
        return [dd.shard(mine, k, chunks) for k in range(chunks)]  # already local: take(), not local()


class TensorSource(Source):
    """A :class:`~descend.data.Split` of in-memory tensors."""

    def __init__(self, split: Split) -> None:
        self.split, self.n = split, len(split)

    def take(self, batch: Batch) -> Example:
        return tuple([t[batch] for t in self.split.inputs]), self.split.targets[batch]


def _unpack(batch: Any) -> Example:
    if isinstance(batch, Split):
        return batch.inputs, batch.targets
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"a batch must be a tuple (input_1, ..., input_k, target), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return tuple(batch[:-1]), batch[-1]


class DataSource(Source):
    """A map-style ``Dataset``; items ``(input_1, ..., input_k, target)`` are collated with ``default_collate``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.n = dataset, len(dataset)  # type: ignore[arg-type]

    def take(self, batch: Batch) -> Example:
        index = range(*batch.indices(self.n)) if isinstance(batch, slice) else batch.tolist()
        return _unpack(default_collate([self.dataset[i] for i in index]))


class LoaderSource(Source):
    """A ``DataLoader``: its batches are the micro-batches; ``n`` is ``None``."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.n = loader, None

    def take(self, batch: Any) -> Example:
        return _unpack(batch)

    def local(self, batch: Any, world: int | None = None) -> Example:
        return self.take(batch)

    def local_count(self, batch: Any, world: int | None = None) -> int:
        return int(self.take(batch)[1].shape[0])

    def total(self, batches: list[Any]) -> int:
        count = sum(self.local_count(b) for b in batches)
        return int(dd.all_reduce_sum([count])[0]) if dd.world_size() > 1 else count

    def eval_batches(self, chunk_size: int, limit: int | None = None) -> Any:
        return self.loader  # a loader's batches are the evaluation set as given


def as_source(data: Any) -> Source:
    """The :class:`Source` for one split: a ``Split``, a map-style ``Dataset`` or a ``DataLoader``."""
    if isinstance(data, Source):
        return data
    if isinstance(data, Split):
        return TensorSource(data)
    if isinstance(data, DataLoader):
        return LoaderSource(data)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return DataSource(data)
    raise TypeError(
        f"a split must be a descend Split, a map-style torch Dataset (with __len__) or a DataLoader; "
        f"got {type(data).__name__}"
    )


def as_sources(data: Any) -> dict[str, Source]:
    """``{"train": ..., "val": ..., "test": ...}`` (val/test optional) from a ``DataBundle``, a mapping
    of split names, or one train split."""
    if isinstance(data, DataBundle):
        return {name: as_source(getattr(data, name)) for name in SPLITS}
    if isinstance(data, Mapping):
        unknown = set(data) - set(SPLITS)
        if unknown or "train" not in data:
            raise ValueError(f"data must map 'train' (and optionally 'val', 'test') to splits; got keys {sorted(data)}")
        return {name: as_source(data[name]) for name in SPLITS if data.get(name) is not None}
    return {"train": as_source(data)}


def first_targets(source: Source) -> Tensor:
    """The targets of one example batch of ``source`` (to infer the task)."""
    if isinstance(source, LoaderSource):
        return source.take(next(iter(source.loader)))[1]
    return source.take(slice(0, min(2, source.n or 0)))[1]


def infer_task(data: Any, sources: dict[str, Source]) -> str:
    """``data.task`` for a ``DataBundle``; else classification for integer targets, regression otherwise."""
    task = getattr(data, "task", None)
    if task in ("classification", "regression"):
        return str(task)
    targets = first_targets(sources["train"])
    return "regression" if torch.is_floating_point(targets) else "classification"
