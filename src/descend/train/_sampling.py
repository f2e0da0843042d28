"""Which training examples each optimizer step sees.

A sampler yields, per optimizer step, a list of *micro-batches* (index tensors or slices into the
training split). The step's gradient is the size-weighted mean over its micro-batches,

    g = Σ_j (m_j / Σ_k m_k) · ∇ loss(batch_j),

which is the gradient of the mean loss over all examples the step saw. Full-batch gradient descent
is the sampler whose one step covers the whole set, cut into chunks only to bound memory.

This is the one sampler for every world size: at ``W`` processes every rank runs its own copy with
the same seed, so all ranks draw the same global micro-batches, and each keeps its share of every
one (:func:`descend.distributed.shard`, the identity at ``W = 1``). A ``DataLoader``'s batches are
taken as they come (:class:`Stream`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from descend._random import generator

Batch = Tensor | slice

__all__ = ["STORED_ORDER_LIMIT", "Batch", "FullBatch", "KeyedPermutation", "Minibatch", "Sampler", "Stream"]

#: Up to this many training examples an epoch's shuffled order is stored (8 bytes an example, also in
#: every checkpoint); above it the order is computed from a key (:class:`KeyedPermutation`).
STORED_ORDER_LIMIT = 1 << 20

_MASK31 = (1 << 31) - 1


class KeyedPermutation:
    """A pseudo-random permutation of ``range(n)`` computed from four 31-bit ``keys``, never stored.

    A 4-round Feistel network permutes ``[0, 4^h)`` (the smallest such range holding ``n``), and
    cycle-walking (apply it again while the result is ``>= n``) restricts it to ``[0, n)``: still a
    bijection, with fewer than 4 applications per index on average. ``self(positions)`` maps the
    positions of an epoch to example indices, so a batch costs its own size whatever ``n`` is.
    """

    def __init__(self, n: int, keys: Tensor) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.keys = n, [int(k) & _MASK31 for k in keys.tolist()]
        self.half = max(1, math.ceil(math.log2(n) / 2)) if n > 1 else 1
        if self.half > 31:
            raise ValueError(f"n={n} is beyond 2^62 examples")

    def _round(self, right: Tensor, key: int) -> Tensor:
        y = (right * 0x5BD1E995 + key) & _MASK31  # right < 2^31: the product stays below 2^62
        y = y ^ (y >> 15)
        y = (y * 0x2C1B3C6D) & _MASK31
        return (y ^ (y >> 12)) & ((1 << self.half) - 1)

    def _feistel(self, x: Tensor) -> Tensor:
        mask = (1 << self.half) - 1
        left, right = x >> self.half, x & mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self.half) | right

    def __call__(self, positions: Tensor) -> Tensor:
        out = self._feistel(positions.to(torch.int64))
        outside = out >= self.n
        while bool(outside.any()):
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out


class Sampler:
    """Base: ``next_step()`` gives the micro-batches of one optimizer step; state is checkpointable."""

    n: int
    steps_per_epoch: int
    examples_seen: int = 0

    @property
    def epoch(self) -> float:
        """Passes over the training set so far (examples seen / ``n``)."""
        return self.examples_seen / self.n

    def next_step(self) -> list[Batch]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, object]:
        return {"examples_seen": self.examples_seen}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.examples_seen = int(state["examples_seen"])  # type: ignore[arg-type]


class FullBatch(Sampler):
    """Every step covers all ``n`` examples, in chunks of at most ``chunk_size`` (``None``: one chunk)."""

    def __init__(self, n: int, chunk_size: int | None = None) -> None:
        if n < 1:
            raise ValueError(f"the training split is empty (n={n})")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.n, self.steps_per_epoch = n, 1
        size = n if chunk_size is None else min(chunk_size, n)
        self.chunks = [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def next_step(self) -> list[Batch]:
        self.examples_seen += self.n
        return list(self.chunks)


class Minibatch(Sampler):
    """Stochastic batches of ``batch_size`` examples, ``accumulation`` of them per optimizer step.

    Without replacement, the set is reshuffled at the start of every epoch and the last batch of an
    epoch holds the remainder (``n mod batch_size`` examples, when not zero). Above
    :data:`STORED_ORDER_LIMIT` examples (a large text corpus) the epoch's order is a
    :class:`KeyedPermutation`, so neither memory nor a checkpoint holds ``n`` indices. With replacement, each
    batch is ``batch_size`` independent uniform draws. Randomness comes from a private generator
    seeded with ``seed``, so the global RNG is untouched and the stream resumes exactly.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, replacement: bool = False,
                 accumulation: int = 1) -> None:
        if n < 1:
            raise ValueError(f"the training split is empty (n={n})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        self.n, self.batch_size = n, min(batch_size, n)
        self.replacement, self.accumulation = replacement, accumulation
        self.generator = generator(seed)
        self.batches_per_epoch = math.ceil(n / self.batch_size)
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / accumulation))
        self.order = torch.empty(0, dtype=torch.int64)  # this epoch's order, or its keys above the limit
        self.keyed = n > STORED_ORDER_LIMIT
        self.position = n if self.keyed else 0  # the first batch starts an epoch

    def _next_batch(self) -> Tensor:
        if self.replacement:
            batch = torch.randint(self.n, (self.batch_size,), generator=self.generator)
            self.examples_seen += self.batch_size
            return batch
        if self.position >= (self.n if self.keyed else self.order.shape[0]):
            if self.keyed:
                self.order = torch.randint(1 << 31, (4,), generator=self.generator)
            else:
                self.order = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        start, stop = self.position, min(self.position + self.batch_size, self.n)
        self.position = stop
        self.examples_seen += stop - start
        if self.keyed:
            return KeyedPermutation(self.n, self.order)(torch.arange(start, stop))
        return self.order[start:stop]

    def next_step(self) -> list[Batch]:
        return [self._next_batch() for _ in range(self.accumulation)]

    def state_dict(self) -> dict[str, object]:
        return {
            "examples_seen": self.examples_seen,
            "position": self.position,
            "order": self.order.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        super().load_state_dict(state)
        self.position = int(state["position"])  # type: ignore[arg-type]
        self.order = state["order"].clone()  # type: ignore[union-attr]
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]


class Stream(Sampler):
    """The batches of a ``DataLoader`` in its own order, ``accumulation`` of them per optimizer step.

    An epoch is one pass over the loader; a step never spans two epochs (the last step of an epoch
    may have fewer batches). At each new epoch ``loader.sampler.set_epoch(epoch)`` is called when
    it exists (``DistributedSampler``). Resuming skips the batches of the current epoch already used,
    which continues the run exactly when the loader's order is reproducible (a seeded generator).
    """

    def __init__(self, loader: Any, accumulation: int = 1) -> None:
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        try:
            batches = len(loader)
        except TypeError:
            raise ValueError("a DataLoader for training needs a length (an iterable-style dataset has none)") from None
        if batches < 1:
            raise ValueError("the training DataLoader yields no batches")
        self.loader, self.accumulation = loader, accumulation
        self.n, self.batches_per_epoch = batches, batches  # ``epoch`` counts passes: examples_seen counts batches
        self.steps_per_epoch = math.ceil(batches / accumulation)
        self.epochs_done, self.position = 0, 0
        self._iterator: Any = None

    def _start_epoch(self) -> None:
        set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epochs_done)
        self._iterator = iter(self.loader)
        for _ in range(self.position):  # resumed mid-epoch
            next(self._iterator)

    def next_step(self) -> list[Any]:
        if self.position >= self.batches_per_epoch:
            self.epochs_done, self.position, self._iterator = self.epochs_done + 1, 0, None
        if self._iterator is None:
            self._start_epoch()
        count = min(self.accumulation, self.batches_per_epoch - self.position)
        batches = [next(self._iterator) for _ in range(count)]
        self.position += count
        self.examples_seen += count
        return batches

    def state_dict(self) -> dict[str, object]:
        return {"examples_seen": self.examples_seen, "epochs_done": self.epochs_done, "position": self.position}

    def load_state_dict(self, state: dict[str, object]) -> None:
        super().load_state_dict(state)
        self.epochs_done = int(state["epochs_done"])  # type: ignore[arg-type]
        self.position = int(state["position"])  # type: ignore[arg-type]
        self._iterator = None
