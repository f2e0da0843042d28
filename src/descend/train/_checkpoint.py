"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

Layout of a checkpoint root (e.g. ``run/checkpoint/``)::

    latest.json               {"format": 1, "step": 10, "dir": "step-00000010"}  (replaced atomically)
    step-00000010/
        model.safetensors     the model's state_dict
        state.safetensors     every other tensor (optimizer moments, RNG states, sampler order)
        state.json            the rest as JSON; tensors appear as {"__tensor__": "<key>"}, and
                              the SHA-256 of both .safetensors files

A step directory is written under a temporary name and renamed into place; ``latest.json`` is
then replaced with ``os.replace``; only after that are older step directories removed (the newest
``keep`` survive). A crash at any point leaves ``latest.json`` pointing at a complete checkpoint.
Loading verifies the checksums and never unpickles anything.

A run of ``W > 1`` processes writes its step directories with torch.distributed.checkpoint
instead (every rank its shards, plus a ``.metadata`` file; see :func:`is_sharded`), and
``latest.json`` gains ``"kind": "dcp"``; it is replaced only after every rank has finished, so the
same guarantee holds. Either kind resumes at any world size (``Trainer.resume``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "commit_checkpoint",
    "decode",
    "encode",
    "is_sharded",
    "latest_dir",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


def encode(obj: Any, tensors: dict[str, Tensor], prefix: str = "") -> Any:
    """``obj`` as JSON-able data; its tensors move into ``tensors`` under unique keys.

    Dicts with non-string keys (e.g. torch optimizers' ``{0: {...}}``) and tuples are tagged so
    :func:`decode` restores them exactly.
    """
    if isinstance(obj, Tensor):
        key = prefix or f"t{len(tensors)}"
        while key in tensors:
            key += "_"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: encode(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors), encode(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint (JSON + tensors only)")


def decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        return {k: decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    return obj


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically: a temporary file in the same directory, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns: the step, the model's tensors and the decoded state."""

    step: int
    path: Path
    model: dict[str, Tensor]
    state: dict[str, Any]


def save_checkpoint(
    root: str | Path, step: int, model_state: dict[str, Tensor], state: dict[str, Any], *, keep: int = 2
) -> Path:
    """Write a checkpoint for ``step`` under ``root`` atomically; return its directory.

    ``state`` may nest dicts, lists, tuples, numbers, strings and tensors (e.g. an optimizer's
    ``state_dict()``). The newest ``keep`` step directories are kept.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        tensors: dict[str, Tensor] = {}
        encoded = encode(state, tensors)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file(tensors, tmp / "state.safetensors")
        meta = {
            "format": FORMAT,
            "step": step,
            "sha256": {f: _sha256(tmp / f) for f in ("model.safetensors", "state.safetensors")},
            "state": encoded,
        }
        _write_json(tmp / "state.json", meta)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_checkpoint(root, step, name, keep=keep)
    return final


def commit_checkpoint(root: str | Path, step: int, name: str, *, keep: int = 2, kind: str | None = None) -> None:
    """Point ``root/latest.json`` at the complete step directory ``name``, then drop all but the newest ``keep``."""
    root = Path(root)
    entry: dict[str, Any] = {"format": FORMAT, "step": step, "dir": name}
    if kind is not None:
        entry["kind"] = kind
    _write_json(root / "latest.json", entry)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def is_sharded(path: str | Path) -> bool:
    """True for a step directory written by torch.distributed.checkpoint (a multi-process run)."""
    return (Path(path) / ".metadata").is_file()


def latest_dir(root: str | Path) -> Path:
    """The step directory ``root/latest.json`` points at (or ``root`` itself, a step directory)."""
    root = Path(root)
    if (root / "latest.json").is_file():
        try:
            latest = json.loads((root / "latest.json").read_text())
            return root / str(latest["dir"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint index {root / 'latest.json'} is corrupt ({e})") from e
    if (root / "state.json").is_file() or is_sharded(root):
        return root
    raise CheckpointError(f"no checkpoint in {root} (expected latest.json or state.json)")


def load_checkpoint(root: str | Path) -> Checkpoint:
    """Read the checkpoint ``root/latest.json`` points at (or ``root`` itself, a step directory).

    Raises :class:`CheckpointError` naming the problem when anything is missing or corrupt.
    """
    path = latest_dir(root)
    if is_sharded(path):
        raise CheckpointError(
            f"checkpoint {path} was written by several processes (torch.distributed.checkpoint); "
            "load it with Trainer.resume, which reads it at any world size"
        )
    try:
        meta = json.loads((path / "state.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} is incomplete: {e.filename} is missing") from e
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: state.json is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {path} has format {found!r}; this version of descend reads format {FORMAT}")
    for name, digest in meta.get("sha256", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its recorded SHA-256")
    try:
        model = load_file(path / "model.safetensors")
        tensors = load_file(path / "state.safetensors")
        state = decode(meta["state"], tensors)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}") from e
    return Checkpoint(step=int(meta["step"]), path=path, model=model, state=state)


def rng_state() -> dict[str, Tensor]:
    """The global torch RNG states (CPU, and CUDA when present) as tensors."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
