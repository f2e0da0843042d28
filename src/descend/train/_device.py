"""Where training runs: choosing the device, moving batches to it, and bf16 autocast.

``device=None`` or ``"auto"`` is the rank's device under torchrun (``cuda:LOCAL_RANK`` when the
process group uses NCCL), else ``cuda`` when CUDA is available, else ``cpu``. An explicit device
that this machine lacks is a :class:`ValueError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from descend import distributed as dd

__all__ = ["autocast", "cast_model", "move", "place_model", "resolve_device"]

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The ``torch.device`` that ``device`` names on this machine (see the module docstring)."""
    if device is None or device == "auto":
        if dd.is_distributed():
            return dd.device()
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use {DEVICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} is not available: this machine has no CUDA; use cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={str(device)!r} is not available: this machine has {count} CUDA device(s)")
        if dev.index is None and dd.is_distributed():
            return dd.device()  # each rank its own GPU, cuda:LOCAL_RANK
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={str(device)!r} is not available: this machine has no MPS; use cpu or auto")
        return dev
    raise ValueError(f"device={str(device)!r} is not supported; use {DEVICES}")


def device_name(device: torch.device) -> str:
    """What ``device`` is, for a benchmark's record: the GPU's name, else the CPU's (its architecture
    where the platform does not name it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def place_model(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Put ``model`` (and any optimizer state it already has) on ``device``.

    A DDP/FSDP2-wrapped model was placed by :func:`descend.distributed.wrap`; it must already be on
    ``device``. ``Module.to`` keeps the parameter objects, so the optimizer still holds them.
    """
    params = list(model.parameters())
    if not params:
        return
    here = params[0].device
    if here.type == device.type and (device.index is None or here.index == device.index):
        return
    if dd.is_data_parallel(model):
        raise ValueError(f"the wrapped model is on {here}, not on device={str(device)!r}; wrap it on that device")
    model.to(device)
    for state in optimizer.state.values():  # state built before the move (e.g. by an earlier fit)
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() > 0:  # 0-d ``step`` counters stay where torch keeps them
                state[key] = value.to(device)


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters and buffers to ``dtype``, in place (the parameter objects stay, so
    an optimizer built on them still holds them). A DDP/FSDP-wrapped model must be cast before it is wrapped."""
    floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if all(t.dtype == dtype for t in floating):
        return
    if dd.is_data_parallel(model):
        raise ValueError(f"the wrapped model's parameters are not {dtype}: cast the model (model.to({dtype})) "
                         "before wrapping it in DDP/FSDP")
    model.to(dtype)


def move(inputs: Sequence[Tensor], targets: Tensor, device: torch.device) -> tuple[tuple[Tensor, ...], Tensor]:
    """A batch ``(inputs, targets)`` on ``device``; CPU → CUDA copies go through pinned memory, without
    blocking the host. A CPU batch for the CPU comes back as it is (the step's common case)."""
    kind = device.type
    if kind == "cpu" and targets.is_cpu and all(t.is_cpu for t in inputs):
        return tuple(inputs), targets
    batch = (*inputs, targets)
    if kind == "cuda":
        pinned = [t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory() for t in batch]
        moved = [t.to(device, non_blocking=True) for t in pinned]
    else:
        moved = [t.to(device) for t in batch]
    return tuple(moved[:-1]), moved[-1]


def autocast(device: torch.device, bf16: bool) -> Any:
    """bf16 autocast on ``device`` when ``bf16`` (forward and loss only), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
