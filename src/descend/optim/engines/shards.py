"""Sharded parameters (FSDP2's DTensors): the rules are elementwise, so an engine steps a DTensor's local
shard; where the shard sits in the whole tensor gives its elements' rounding noise."""

from __future__ import annotations

import math

from torch import Tensor

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]
try:  # where a shard starts; a torch without it draws each shard's noise from its first element
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    compute_local_shape_and_global_offset = None

__all__ = ["DTensor", "local", "shard_offset"]


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: updating it updates the DTensor); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_offset(t: Tensor) -> int:
    """The flat index, in the whole tensor, of the first element of ``t``'s local shard: 0 for a tensor that is
    not a DTensor, or a shard that is not one contiguous range of the whole (sharded along a dimension other
    than the first: FSDP2 shards the first)."""
    if not isinstance(t, DTensor) or t.dim() == 0 or compute_local_shape_and_global_offset is None:
        return 0
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if any(offset[1:]) or tuple(shape[1:]) != tuple(t.shape[1:]):
        return 0
    return offset[0] * math.prod(t.shape[1:])
