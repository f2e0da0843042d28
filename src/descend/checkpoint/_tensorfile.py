"""What both kinds of checkpoint share: the JSON + tensors codec and the checksummed manifest.

The one-process format (:mod:`descend.checkpoint._local`) and the DCP format
(:mod:`descend.checkpoint._distributed`) both build on this module, so neither imports the other.

A checkpoint step directory holds its data files and a ``manifest.json`` written last::

    {"format": 2, "kind": "single" | "dcp", "step": 10,
     "files": {"state.json": {"bytes": 1234, "sha256": "..."}, ...},
     "checksum": "<SHA-256 of the canonical JSON of everything above>"}

:func:`verify_step` accepts a directory only when the manifest's own checksum holds, it names
every file in the directory (no file more, none less, no links, no subdirectories) and every
file's size and SHA-256 match. The manifest is parsed with :mod:`json`, never with pickle.

What a checksum proves: the files are the ones descend wrote, unchanged since (no bit rot, no
truncation, no planted or replaced file). It is not a signature: someone who can write the run
directory and recomputes every checksum can forge a consistent checkpoint. One-process
checkpoints are still safe to load then (safetensors + JSON hold no code); DCP checkpoints are
read through a restricted unpickler (see :mod:`descend.checkpoint._distributed`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from descend._io import atomic_write

__all__ = [
    "FORMAT",
    "MANIFEST",
    "CheckpointError",
    "CheckpointWarning",
    "IncompleteCheckpointError",
    "decode",
    "encode",
    "read_checked_json",
    "sha256_bytes",
    "sha256_file",
    "verify_step",
    "write_checked_json",
    "write_manifest",
]

#: Version of the on-disk layout (1: no manifest; 2: every file in a checksummed manifest).
FORMAT = 2
MANIFEST = "manifest.json"
KINDS = ("single", "dcp")
#: Files each kind of step directory must hold (besides the manifest).
REQUIRED = {"single": ("model.safetensors", "state.safetensors", "state.json"), "dcp": (".metadata", "extra.json")}
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, forged, or does not match what it is loaded into."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint directory lacks a file it needs (e.g. a save was cut short)."""


class CheckpointWarning(UserWarning):
    """Resume used another checkpoint than the newest (it failed verification or training diverged)."""


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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def write_checked_json(path: Path, obj: dict[str, Any]) -> None:
    """``obj`` plus a ``"checksum"`` of its canonical JSON, written atomically."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    atomic_write(path, json.dumps({**body, "checksum": sha256_bytes(_canonical(body))}, indent=1) + "\n")


def read_checked_json(path: Path, what: str) -> dict[str, Any]:
    """A :func:`write_checked_json` file's content (without ``"checksum"``); CheckpointError unless it verifies."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise IncompleteCheckpointError(f"{what} {path} is missing") from e
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{what} {path} is corrupt: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("checksum"), str):
        raise CheckpointError(f"{what} {path} is corrupt: it has no checksum")
    body = {k: v for k, v in data.items() if k != "checksum"}
    try:
        ok = sha256_bytes(_canonical(body)) == data["checksum"]
    except ValueError:  # NaN/Infinity: never written by descend
        ok = False
    if not ok:
        raise CheckpointError(f"{what} {path} does not match its checksum (edited or corrupt)")
    if body.get("format") != FORMAT:
        raise CheckpointError(
            f"{what} {path} has format {body.get('format')!r}; this version of descend reads format {FORMAT}"
        )
    return body


def write_manifest(directory: str | Path, kind: str, step: int) -> None:
    """Hash every file in ``directory`` into its ``manifest.json`` (written last, atomically)."""
    directory = Path(directory)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.name != MANIFEST and p.is_file()
    }
    write_checked_json(directory / MANIFEST, {"format": FORMAT, "kind": kind, "step": int(step), "files": files})


#: Directories verified in this process, by their files' (name, size, inode, mtime, ctime): a resume
#: asks several times, and an unchanged directory is not hashed again (any write changes ctime).
_VERIFIED: dict[Path, tuple[tuple[Any, ...], dict[str, Any]]] = {}


def _signature(directory: Path) -> tuple[Any, ...]:
    stats = [(p.name, p.lstat()) for p in directory.iterdir()]
    return tuple(sorted((n, s.st_size, s.st_ino, s.st_mode, s.st_mtime_ns, s.st_ctime_ns) for n, s in stats))


def verify_step(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Check a step directory against its manifest; return the manifest or raise :class:`CheckpointError`.

    Refused: a missing, edited or unparsable manifest; a file not named in it (e.g. a planted
    ``.metadata``) or named but missing; a link or subdirectory; a size or SHA-256 mismatch; a
    ``kind`` other than the one asked for.
    """
    directory = Path(directory)
    if directory.is_dir() and not directory.is_symlink():
        key, signature = directory.resolve(), _signature(directory)
        cached = _VERIFIED.get(key)
        if cached is not None and cached[0] == signature:
            manifest = cached[1]
        else:
            manifest = _verify(directory)
            _VERIFIED[key] = (signature, manifest)
    else:
        manifest = _verify(directory)
    if kind is not None and manifest["kind"] != kind:
        raise CheckpointError(f"checkpoint {directory} is a {manifest['kind']!r} checkpoint, expected {kind!r}")
    return manifest


def _verify(directory: Path) -> dict[str, Any]:
    where = f"checkpoint {directory}"
    if directory.is_symlink() or not directory.is_dir():
        raise IncompleteCheckpointError(f"{where} is not a directory")
    if not (directory / MANIFEST).is_file():
        legacy = (directory / "state.json").is_file() or (directory / ".metadata").is_file()
        why = (
            "it was written by an older descend (format 1) whose files are not all checksummed; "
            "retrain or load it with that version"
            if legacy
            else "the save was cut short"
        )
        raise IncompleteCheckpointError(f"{where} has no {MANIFEST}: {why}")
    m = read_checked_json(directory / MANIFEST, "checkpoint manifest")
    files = m.get("files")
    if (
        m.get("kind") not in KINDS
        or not isinstance(m.get("step"), int)
        or isinstance(m.get("step"), bool)
        or m["step"] < 0
        or not isinstance(files, dict)
    ):
        raise CheckpointError(f"{where} has a malformed {MANIFEST}")
    present = {p.name: p for p in directory.iterdir() if p.name != MANIFEST}
    for name in sorted(present.keys() - files.keys()):
        raise CheckpointError(f"{where} holds {name}, a file its manifest does not name (planted or left over)")
    for name in REQUIRED[m["kind"]]:
        if name not in files:
            raise CheckpointError(f"{where} has a malformed {MANIFEST}: it does not name {name}")
    for name, entry in sorted(files.items()):
        path = present.get(name)
        if path is None:
            raise IncompleteCheckpointError(f"{where} is incomplete: {name} is missing")
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{where} is corrupt: {name} is not a plain file")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _HEX64.fullmatch(entry["sha256"])):
            raise CheckpointError(f"{where} has a malformed {MANIFEST} entry for {name}")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{where} is corrupt: {name} does not match its recorded SHA-256")
    return m
