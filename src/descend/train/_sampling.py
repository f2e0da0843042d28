"""Which training examples each optimizer step sees.

A sampler yields, per optimizer step, a list of *micro-batches* (index tensors or slices into the
training split). The step's gradient is the size-weighted mean over its micro-batches,

    g = Σ_j (m_j / Σ_k m_k) · ∇ loss(batch_j),

which is the gradient of the mean loss over all examples the step saw. Full-batch gradient descent
is the sampler whose one step covers the whole set, cut into chunks only to bound memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Batch = Tensor | slice

__all__ = ["Batch", "FullBatch", "Minibatch", "Sampler"]


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
    epoch holds the remainder (``n mod batch_size`` examples, when not zero). With replacement, each
    batch is ``batch_size`` independent uniform draws. Randomness comes from a private generator
    seeded with ``seed``, so the global RNG is untouched and the stream resumes exactly.
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int = 0, replacement: bool = False, accumulation: int = 1
    ) -> None:
        if n < 1:
            raise ValueError(f"the training split is empty (n={n})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        self.n, self.batch_size = n, min(batch_size, n)
        self.replacement, self.accumulation = replacement, accumulation
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_per_epoch = math.ceil(n / self.batch_size)
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / accumulation))
        self.order = torch.empty(0, dtype=torch.int64)
        self.position = 0

    def _next_batch(self) -> Tensor:
        if self.replacement:
            batch = torch.randint(self.n, (self.batch_size,), generator=self.generator)
        else:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator)
                self.position = 0
            batch = self.order[self.position : self.position + self.batch_size]
            self.position += len(batch)
        self.examples_seen += len(batch)
        return batch

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
