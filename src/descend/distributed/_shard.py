"""Sharding a step's examples over ranks so the averaged gradient is the single-process gradient.

One process takes a step on a global batch ``S`` of ``N = |S|`` examples with the gradient of the
mean loss ``(1/N) sum_{i in S} grad l_i``. With ``W`` ranks, rank ``r`` takes a share ``S_r`` of
the *same* ``S`` (the shares partition it; sizes differ by at most one) and backpropagates

    loss_r = (W / N) * sum_{i in S_r} l_i,

then DDP/FSDP2 average over ranks: ``(1/W) sum_r grad loss_r = (1/N) sum_{i in S} grad l_i``,
exactly the single-process gradient for any split, equal or not. :func:`grad_scale` is ``W / N``.
At ``W = 1`` the share is the whole batch and ``grad_scale`` is ``1 / N``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from descend.distributed._env import all_reduce_sum, rank, world_size
from descend.distributed._env import world_size as _world

Batch = Tensor | slice

__all__ = ["Batch", "batch_size_of", "grad_norm", "grad_scale", "local_tensor", "shard", "total_norm"]


def _rank_world(rank_: int | None, world: int | None) -> tuple[int, int]:
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"need 0 <= rank < world_size, got rank={r}, world_size={w}")
    return r, w


def shard(batch: Batch, rank: int | None = None, world_size: int | None = None) -> Batch:
    """Rank ``rank``'s contiguous share of ``batch`` (index tensor or slice) among ``world_size`` ranks.

    The first ``len % world_size`` ranks get one example more (``torch.tensor_split``'s rule).
    Defaults: this process's rank and the world size; with one rank the batch itself comes back.
    """
    if (world_size if world_size is not None else _world()) == 1 and rank in (None, 0):
        return batch  # a world of one: the hot path of every one-process step
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


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 DTensor (a plain tensor as it is)."""
    return t.to_local() if isinstance(t, DTensor) else t


def total_norm(tensors: Iterable[Tensor]) -> float:
    """``sqrt(Σ_t ||t||²)`` over whole tensors, equal on every rank.

    Each tensor's norm is taken in float32 (float64 for a float64 tensor), one ``_foreach_norm`` per
    device and dtype, and the squares are summed in float64 where the device has it. FSDP2 DTensors
    hold a shard per rank: their squares are summed over ranks (one all-reduce). Plain tensors are
    replicas (DDP) or the only copy (one process) and are counted once.
    """
    groups: dict[tuple[bool, torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        local = local_tensor(t).detach()
        groups.setdefault((isinstance(t, DTensor), local.device, local.dtype), []).append(local)
    sharded = replicated = 0.0
    for (is_shard, device, dtype), locals_ in groups.items():
        wide = torch.float32 if device.type == "mps" else torch.float64
        norms = torch._foreach_norm(locals_, 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        square = float(torch.stack(norms).to(wide).square().sum())
        if is_shard:
            sharded += square
        else:
            replicated += square
    if world_size() > 1 and any(is_shard for is_shard, _, _ in groups):
        sharded = all_reduce_sum([sharded])[0]
    return math.sqrt(replicated + sharded)


def grad_norm(parameters: Any, norm_type: float = 2.0) -> float:
    """The global gradient norm over all ranks' shards (a plain float, equal on every rank).

    For FSDP2 parameters the gradients are DTensors: their norm is reduced over the shards.
    Replicated (DDP) gradients are the same on every rank, so no communication is needed.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=False)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return float(total)
