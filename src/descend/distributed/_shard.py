"""Split each step's examples over ranks so the averaged gradient is the single-process gradient.

One process takes a step on a global batch ``S`` of ``N = |S|`` examples with the gradient of the
mean loss ``(1/N) sum_{i in S} grad l_i``. With ``W`` ranks, rank ``r`` takes a share ``S_r`` of
the *same* ``S`` (the shares partition it; sizes differ by at most one) and backpropagates

    loss_r = (W / N) * sum_{i in S_r} l_i,

then DDP/FSDP2 average over ranks: ``(1/W) sum_r grad loss_r = (1/N) sum_{i in S} grad l_i``,
exactly the single-process gradient for any split, equal or not. :func:`grad_scale` is ``W / N``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from descend.distributed._env import all_reduce_sum, rank, world_size
from descend.distributed._wrap import check_wrapped, sync_gradients

Batch = Tensor | slice


def _rank_world(rank_: int | None, world: int | None) -> tuple[int, int]:
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"need 0 <= rank < world_size, got rank={r}, world_size={w}")
    return r, w


def shard(batch: Batch, rank: int | None = None, world_size: int | None = None) -> Batch:
    """Rank ``rank``'s contiguous share of ``batch`` (index tensor or slice) among ``world_size`` ranks.

    The first ``len % world_size`` ranks get one example more (``torch.tensor_split``'s rule).
    Defaults: this process's rank and the world size.
    """
    r, w = _rank_world(rank, world_size)
    if isinstance(batch, slice):
        if batch.stop is None or batch.step not in (None, 1):
            raise ValueError(f"can only shard slices with a stop and step 1, got {batch!r}")
        start, stop = batch.start or 0, batch.stop
        n = max(0, stop - start)
        base, extra = divmod(n, w)
        lo = start + r * base + min(r, extra)
        return slice(lo, lo + base + (1 if r < extra else 0))
    return torch.tensor_split(batch, w)[r]


def batch_size_of(batch: Batch) -> int:
    """Number of examples in an index tensor or a slice with explicit bounds."""
    if isinstance(batch, slice):
        return max(0, batch.stop - (batch.start or 0))
    return len(batch)


def grad_scale(global_count: int, world: int | None = None) -> float:
    """``W / N``: multiply a rank's *summed* loss by this so the averaged gradient is the global mean."""
    if global_count < 1:
        raise ValueError(f"global_count must be >= 1, got {global_count}")
    return (world_size() if world is None else world) / global_count


class GlobalBatchSampler:
    """Minibatches of a global size ``batch_size``, each split over the ranks.

    Epoch ``e`` visits the examples in the order of a permutation drawn from a generator seeded by
    ``(seed, e)``, in consecutive batches of ``batch_size`` (the last one holds the remainder unless
    ``drop_last``). Step ``t`` is batch ``t mod steps_per_epoch`` of epoch ``t // steps_per_epoch``,
    the same on every rank and for every world size; rank ``r`` keeps :func:`shard` of it. The
    sampler holds no state beyond the step number, so a resumed run (any world size) continues it.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1 (the number of training examples), got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"drop_last=True with batch_size={batch_size} > n={n} leaves no batch")
        self.n, self.batch_size, self.seed, self.drop_last = n, min(batch_size, n), seed, drop_last
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.steps_per_epoch = n // self.batch_size if drop_last else math.ceil(n / self.batch_size)
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def permutation(self, epoch: int) -> Tensor:
        """The example order of ``epoch`` (int64 ``[n]``)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed & 0x7FFFFFFF) * 2**32 + epoch)
            self._order, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._order

    def global_batch(self, step: int) -> Tensor:
        """All example indices of optimizer step ``step`` (0-based), as one process would use them."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def local_batch(self, step: int) -> Tensor:
        """This rank's share of :meth:`global_batch`."""
        return shard(self.global_batch(step), self.rank, self.world_size)  # type: ignore[return-value]


class ShardedSampler:
    """Wrap a single-process sampler (``next_step() -> list[Batch]``) so each rank keeps its share.

    Every rank runs its own copy of the wrapped sampler with the same seed, so all ranks draw the
    same global micro-batches; ``next_step`` returns this rank's shard of each. The global sizes of
    the last step are in :attr:`global_sizes` (weigh micro-batch ``j`` by ``grad_scale(sum(global_sizes))``
    times its summed loss). State (``state_dict``) is the wrapped sampler's, identical on all ranks.
    """

    def __init__(self, sampler: Any, rank: int | None = None, world_size: int | None = None) -> None:
        self.sampler = sampler
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.global_sizes: list[int] = []

    def next_step(self) -> list[Batch]:
        batches = self.sampler.next_step()
        self.global_sizes = [batch_size_of(b) for b in batches]
        return [shard(b, self.rank, self.world_size) for b in batches]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # n, steps_per_epoch, epoch, examples_seen...
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


def full_batch_backward(model: nn.Module, summed_loss: Callable[[slice], Tensor], n: int,
                        chunk_size: int | None = None) -> float:
    """Accumulate the gradient of the mean loss over all ``n`` examples, split over ranks and chunks.

    Rank ``r`` takes its contiguous share of ``range(n)`` (:func:`shard`), cuts it into the same
    number of chunks as every other rank (at most ``chunk_size`` examples each) and backpropagates
    ``(W / n) * summed_loss(chunk)`` for each, synchronising gradients only on the last chunk. After
    the call every rank holds ``(1/n) sum_i grad l_i`` (call ``zero_grad`` before it, ``step`` after).

    Args:
        model: the DDP/FSDP2-wrapped model (any model in a world of one).
        summed_loss: ``chunk -> sum_{i in chunk} l_i`` (a slice of example indices; may be empty
            only if ``chunk_size`` is below ``n / W``'s share).
        n: number of training examples.
        chunk_size: examples per forward pass (``None``: a rank's whole share at once).

    Returns:
        The mean loss over all ``n`` examples (reduced over ranks).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    check_wrapped(model)
    w = world_size()
    mine = shard(slice(0, n))
    assert isinstance(mine, slice)
    largest = math.ceil(n / w)
    chunks = 1 if chunk_size is None else math.ceil(largest / chunk_size)  # the same on every rank
    scale = grad_scale(n, w)
    total = 0.0
    for k in range(chunks):
        piece = shard(mine, k, chunks)
        assert isinstance(piece, slice)
        with sync_gradients(model, enabled=k == chunks - 1):
            loss = summed_loss(piece)
            (loss * scale).backward()
        total += float(loss.detach())
    return all_reduce_sum([total])[0] / n
