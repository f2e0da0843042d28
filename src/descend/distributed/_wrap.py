"""Wrap a model for data-parallel training: DistributedDataParallel or FSDP2 (``fully_shard``).

Both average the gradients over ranks in the backward pass (DDP all-reduces them, FSDP2
reduce-scatters them to each rank's shard), so a loss whose gradient is ``W/N`` times a rank's
*sum* over its examples gives every rank the mean gradient over all ``N`` examples of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from descend.distributed._env import device as current_device
from descend.distributed._env import is_distributed, world_size

STRATEGIES = ("none", "ddp", "fsdp")


def default_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules FSDP2 shards as units (before the root): the elements of every
    ``nn.ModuleList``/``nn.Sequential`` that hold parameters (transformer or MLP blocks), or, when
    the model has none, its direct children that hold parameters. Nested units come inner first,
    the order ``fully_shard`` must be applied in."""
    units: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            units += [m for m in module if m is not model and any(True for _ in m.parameters())]
    if not units:
        units = [m for m in model.children() if any(True for _ in m.parameters())]
    unique = list({id(m): m for m in units}.values())
    return unique[::-1]  # modules() is pre-order: reversed, inner units are sharded before outer ones


def wrap(model: nn.Module, strategy: str = "ddp", *,
         fsdp_units: Callable[[nn.Module], list[nn.Module]] | None = None) -> nn.Module:
    """Move ``model`` to this rank's device and wrap it for data parallelism.

    Args:
        model: the network, with identical initial parameters on every rank (seed it the same, or
            rely on DDP's broadcast from rank 0; FSDP2 shards each rank's own copy, so seed it).
        strategy: ``"ddp"`` (DistributedDataParallel: full replica per rank, gradients all-reduced),
            ``"fsdp"`` (FSDP2 ``fully_shard`` on each unit and then the root: parameters, gradients
            and optimizer state are DTensors sharded on dim 0 over the ranks) or ``"none"``.
        fsdp_units: picks the submodules sharded as units (default :func:`default_fsdp_units`).

    Returns:
        The wrapped module (``DistributedDataParallel``; for FSDP2 the same module, now an
        ``FSDPModule``). Outside a process group ``"ddp"`` and ``"fsdp"`` raise; use ``"none"``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    dev = current_device()
    model = model.to(dev)
    if strategy == "none":
        return model
    if not is_distributed():
        raise RuntimeError(f"strategy={strategy!r} needs a process group: run under torchrun and call "
                           "descend.distributed.setup() first, or use strategy='none'")
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world_size(),))
    for unit in (fsdp_units or default_fsdp_units)(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (FSDP2 modules are their own)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_gradients(model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """A context in which backward passes synchronise gradients across ranks only if ``enabled``.

    Accumulate micro-batches with ``enabled=False`` and run the last one with ``enabled=True``:
    DDP (``no_sync``) and FSDP2 (``set_requires_gradient_sync``) then communicate once per step.
    For a model that is neither (one process) it is a no-op.
    """
    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_data_parallel(model: nn.Module) -> bool:
    """True for a DDP- or FSDP2-wrapped model (its backward averages gradients over ranks)."""
    return isinstance(model, (DistributedDataParallel, FSDPModule))


def check_wrapped(model: nn.Module) -> None:
    """Raise unless ``model`` synchronises gradients when more than one process trains it."""
    if world_size() > 1 and not is_data_parallel(model):
        raise ValueError(f"with {world_size()} processes the model must be wrapped by descend.distributed.wrap "
                         f"(strategy 'ddp' or 'fsdp') so gradients are averaged; got {type(model).__name__}")


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict[str, Tensor],
                    optimizer_state: dict[str, Any] | None = None) -> None:
    """Load full (unsharded) state dicts, as one process saves them, into ``model`` and ``optimizer``.

    Plain and DDP models load the whole state on every rank. FSDP2 parameters are DTensors: the
    optimizer state is re-keyed from parameter positions to parameter names and each rank keeps its
    shard of every full tensor (``set_state_dict`` with ``full_state_dict=True``). Tensors may be on
    any device; they are copied to the parameters' devices.
    """
    module = unwrap(model)
    if not any(isinstance(p, DTensor) for p in module.parameters()):
        module.load_state_dict(model_state)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    name_of = {id(p): n for n, p in module.named_parameters()}
    by_name: dict[str, Any] = {}
    if optimizer is not None and optimizer_state is not None:
        names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
        by_name = {
            "state": {names[int(i)]: v for i, v in optimizer_state["state"].items()},
            "param_groups": [
                {**g, "params": [names[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]
            ],
        }
    set_state_dict(model, optimizer if optimizer is not None else (), model_state_dict=model_state,
                   optim_state_dict=by_name, options=StateDictOptions(full_state_dict=True))
