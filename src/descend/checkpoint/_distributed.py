"""Checkpoints that reshard: torch.distributed.checkpoint (DCP) for model and optimizer state.

Every rank writes its own shards of the parameters and the optimizer state (for FSDP2, DTensor
shards; for DDP or one process, rank 0's copy of each replicated tensor) into one directory, with a
``.metadata`` file the coordinator writes last. Loading reads whatever pieces each rank of the *new*
world needs, so a checkpoint written by 2 FSDP2 ranks loads into 1 process, DDP, or 4 ranks.

The small loop state (``extra``: step, sampler, RNG states) is written by rank 0 beside the shards as
``extra.json`` + ``extra.safetensors`` (JSON and tensors, no pickle). Rank 0 then writes
``manifest.json``: the size and SHA-256 of every file in the directory, itself checksummed (see
:mod:`descend.checkpoint._tensorfile`). :func:`load_checkpoint` verifies the whole directory against it before
reading anything, so a planted or replaced file is refused. DCP's own ``.metadata`` and its
non-tensor entries are pickles as torch writes them; descend reads them through a restricted
unpickler that builds only DCP's metadata records, sizes, dtypes and plain values, never an
arbitrary callable, so even a forged manifest cannot make a load run code.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from descend._io import atomic_path, atomic_write
from descend.checkpoint._tensorfile import (
    CheckpointError,
    IncompleteCheckpointError,
    decode,
    encode,
    verify_step,
    write_manifest,
)
from descend.distributed._env import barrier, is_distributed, is_main

METADATA = ".metadata"
EXTRA_JSON = "extra.json"
EXTRA_TENSORS = "extra.safetensors"
MANIFEST = "manifest.json"


def _write_extra(path: Path, extra: dict[str, Any]) -> None:
    """``extra`` as JSON + safetensors in ``path``, each file written atomically."""
    import json

    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    encoded = encode(dict(extra), tensors)
    with atomic_path(path / EXTRA_TENSORS) as tmp:
        save_file(tensors, tmp)
    atomic_write(path / EXTRA_JSON, json.dumps(encoded, indent=1))


def _read_extra(path: Path) -> dict[str, Any]:
    import json

    from safetensors.torch import load_file

    tensors = load_file(path / EXTRA_TENSORS) if (path / EXTRA_TENSORS).exists() else {}
    return decode(json.loads((path / EXTRA_JSON).read_text()), tensors)


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else: any other global (``os.system``,
    ``builtins.eval``, ...) is refused before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's .metadata")


class _SafeReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / METADATA, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor entries read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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
    if is_main():  # every rank's files exist once dcp.save returns on the coordinator
        _write_extra(Path(path), dict(extra or {}))
        write_manifest(path, "dcp", int((extra or {}).get("step", 0)))
    barrier()


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` directory into ``model`` (+ ``optimizer``), at any world size.

    The model must be wrapped (or not) as it will train; the optimizer must be built over its
    parameters with the same chain. Returns the ``extra`` dict that was saved.

    Nothing is read before the directory verifies against its ``manifest.json``
    (:func:`descend.checkpoint._tensorfile.verify_step`); a missing, planted, replaced or corrupt file
    raises :class:`~descend.checkpoint.CheckpointError`.
    """
    path = Path(path)
    if not (path / METADATA).exists():
        raise IncompleteCheckpointError(f"no complete DCP checkpoint at {path} (missing {METADATA})")
    verify_step(path, kind="dcp")
    reader = _SafeReader(path)
    try:  # read once here so that a refusal is one clean error, not DCP's per-rank report
        reader.read_metadata()
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} is refused: {e}") from None
    extra = _read_extra(path)
    state = _states(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=reader, planner=_SafePlanner(), no_dist=not is_distributed())
    except CheckpointException as e:  # DCP's wrapper (a BaseException) around each rank's error
        errors = [failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()]
        raise CheckpointError(f"checkpoint {path} could not be loaded: {errors[0] if errors else e}") from None
    if optimizer is None:
        set_state_dict(model, (), model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return extra


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint directory under ``root`` (by name, e.g. ``step_000120``), or None.

    A directory without ``manifest.json`` (written last) was cut short (a rank died while saving)
    and is skipped; :func:`load_checkpoint` verifies the one returned.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / MANIFEST).is_file())
    return done[-1] if done else None


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's full (unsharded) parameters and buffers on CPU. Every rank calls it.

    Rank 0 receives the tensors; under FSDP2 other ranks receive ``{}`` (they only help gather).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}
