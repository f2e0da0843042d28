"""Checkpoints that reshard: torch.distributed.checkpoint (DCP) for model and optimizer state.

Every rank writes its own shards of the parameters and the optimizer state (for FSDP2, DTensor
shards; for DDP or one process, rank 0's copy of each replicated tensor) into one directory, with a
``.metadata`` file the coordinator writes last. Loading reads whatever pieces each rank of the *new*
world needs, so a checkpoint written by 2 FSDP2 ranks loads into 1 process, DDP, or 4 ranks.

The small loop state (``extra``: step, sampler, RNG states) is written by rank 0 beside the shards as
``extra.json`` + ``extra.safetensors`` (JSON and tensors, no pickle). DCP's own ``.metadata`` file is
a pickle, as torch writes it: load sharded checkpoints only from sources you trust.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from descend.distributed._env import barrier, is_distributed, is_main

METADATA = ".metadata"
EXTRA_JSON = "extra.json"
EXTRA_TENSORS = "extra.safetensors"


def _write_extra(path: Path, extra: dict[str, Any]) -> None:
    """``extra`` as JSON + safetensors in ``path``, each file written atomically."""
    from safetensors.torch import save_file

    from descend.train._checkpoint import _write_json, encode

    tensors: dict[str, Tensor] = {}
    encoded = encode(dict(extra), tensors)
    tmp = path / f".{EXTRA_TENSORS}.tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path / EXTRA_TENSORS)
    _write_json(path / EXTRA_JSON, encoded)


def _read_extra(path: Path) -> dict[str, Any]:
    import json

    from safetensors.torch import load_file

    from descend.train._checkpoint import decode

    if not (path / EXTRA_JSON).exists():
        raise FileNotFoundError(f"no complete checkpoint at {path} (missing {EXTRA_JSON})")
    tensors = load_file(path / EXTRA_TENSORS) if (path / EXTRA_TENSORS).exists() else {}
    return decode(json.loads((path / EXTRA_JSON).read_text()), tensors)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group (intended for one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Write model (+ optimizer) state to the directory ``path`` with DCP. Every rank calls it.

    Args:
        path: a directory (created); complete once its ``.metadata`` exists.
        model: plain, DDP- or FSDP2-wrapped model (state keys are the unwrapped module's).
        optimizer: any ``torch.optim`` optimizer over the model's parameters (descend's included).
        extra: small values (numbers, strings, lists, dicts, tensors: step, sampler state, RNG
            states); rank 0's copy is written as JSON + safetensors, without pickle.
    """
    state = _states(model, optimizer)
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=os.fspath(path), no_dist=not is_distributed())
    if is_main():
        _write_extra(Path(path), dict(extra or {}))
    barrier()


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` directory into ``model`` (+ ``optimizer``), at any world size.

    The model must be wrapped (or not) as it will train; the optimizer must be built over its
    parameters with the same chain. Returns the ``extra`` dict that was saved.
    """
    path = Path(path)
    if not (path / METADATA).exists():
        raise FileNotFoundError(f"no complete DCP checkpoint at {path} (missing {METADATA})")
    extra = _read_extra(path)
    state = _states(model, optimizer)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=not is_distributed())
    if optimizer is None:
        set_state_dict(model, (), model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return extra


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint directory under ``root`` (by name, e.g. ``step_000120``), or None.

    A directory without ``.metadata`` was cut short (a rank died while saving) and is skipped.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and (p / METADATA).exists() and (p / EXTRA_JSON).exists())
    return done[-1] if done else None


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's full (unsharded) parameters and buffers on CPU. Every rank calls it.

    Rank 0 receives the tensors; under FSDP2 other ranks receive ``{}`` (they only help gather).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


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

