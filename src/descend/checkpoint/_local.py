"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, every byte checksummed.

Layout of a checkpoint root (e.g. ``run/checkpoint/``)::

    latest.json               {"format": 2, "step": 10, "dir": "step-00000010", "kind": "single",
                               "healthy": "step-00000010", "checksum": "..."}
    step-00000010/
        model.safetensors     the model's state_dict
        state.safetensors     every other tensor (optimizer moments, RNG states, sampler order)
        state.json            the rest as JSON; tensors appear as {"__tensor__": "<key>"}
        manifest.json         size and SHA-256 of every file above, and its own checksum

A step directory is written under a temporary name (``.step-00000010.*``), its manifest last,
and renamed into place; ``latest.json`` is then replaced atomically (:mod:`descend._io`); only
after that are older step directories removed (the newest ``keep``, and the newest healthy one,
survive). A crash at any point leaves ``latest.json`` pointing at a complete checkpoint, and the
next save or resume removes the temporaries a crash left.

A run of ``W > 1`` processes writes its step directories with torch.distributed.checkpoint
instead (every rank its shards, plus DCP's ``.metadata``; rank 0 adds the manifest, see
:func:`descend.distributed.save_checkpoint`), and ``latest.json`` says ``"kind": "dcp"``.

Reading (:func:`latest_dir`, :func:`load_checkpoint`) trusts nothing in the directory:
``latest.json`` must verify and name a ``step-NNNNNNNN`` directory directly inside the root (no
path, no link); the step directory must verify against its manifest (see
:func:`descend.checkpoint._tensorfile.verify_step`), and its kind comes from the manifest, never from which
files happen to exist. When the newest checkpoint fails, resume falls back to the newest one that
verifies, warns in one line (:class:`CheckpointWarning`), renames the bad one to
``<name>.rejected`` (kept for inspection, never deleted) and points ``latest.json`` at the good one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor

from descend._io import atomic_path, atomic_write, fsync_dir, umask_mode
from descend.checkpoint._tensorfile import (
    FORMAT,
    MANIFEST,
    CheckpointError,
    CheckpointWarning,
    IncompleteCheckpointError,
    decode,
    encode,
    read_checked_json,
    sha256_bytes,
    verify_step,
    write_checked_json,
    write_manifest,
)

__all__ = [
    "FORMAT",
    "BackgroundSaver",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "IncompleteCheckpointError",
    "commit_checkpoint",
    "decode",
    "encode",
    "is_sharded",
    "latest_dir",
    "load_checkpoint",
    "save_checkpoint",
]

LATEST = "latest.json"
_STEP_DIR = re.compile(r"step-(\d{8})")


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns: the step, the model's tensors and the decoded state."""

    step: int
    path: Path
    model: dict[str, Tensor]
    state: dict[str, Any]


def save_checkpoint(root: str | Path, step: int, model_state: dict[str, Tensor], state: dict[str, Any], *,
                    keep: int = 2, healthy: bool = True) -> Path:
    """Write a checkpoint for ``step`` under ``root`` atomically; return its directory.

    ``state`` may nest dicts, lists, tuples, numbers, strings and tensors (e.g. an optimizer's
    ``state_dict()``). The newest ``keep`` step directories are kept, and the newest one saved
    with ``healthy=True`` (pass ``False`` while the loss is diverging: resume then offers the last
    healthy one).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(root)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes it private; a step directory is not
        tensors: dict[str, Tensor] = {}
        encoded = encode(state, tensors)
        with atomic_path(tmp / "model.safetensors") as f:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}, f)
        with atomic_path(tmp / "state.safetensors") as f:
            save_file(tensors, f)
        atomic_write(tmp / "state.json", json.dumps({"format": FORMAT, "step": step, "state": encoded}, indent=1))
        write_manifest(tmp, "single", step)
        final = root / name
        if final.exists():  # a save of the same step by an earlier, abandoned run
            shutil.rmtree(final)
        os.replace(tmp, final)  # a directory: descend._io covers files only
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_checkpoint(root, step, name, keep=keep, healthy=healthy)
    return final


def commit_checkpoint(root: str | Path, step: int, name: str, *, keep: int = 2, kind: str | None = None,
                      healthy: bool = True) -> None:
    """Point ``root/latest.json`` at the complete step directory ``name``, then drop older ones.

    Kept: the newest ``keep`` step directories up to ``step``, and the newest committed with
    ``healthy=True``. Directories of later steps (an abandoned run's) and ``*.rejected`` ones stay.
    """
    root = Path(root)
    if _STEP_DIR.fullmatch(name) is None or int(name[5:]) != step:
        raise CheckpointError(f"a checkpoint directory is named step-{step:08d}, got {name!r}")
    if not (root / name / MANIFEST).is_file():
        raise IncompleteCheckpointError(f"checkpoint {root / name} has no {MANIFEST}; it cannot be committed")
    remove_temporaries(root)
    previous = _read_latest(root, quiet=True)
    good = name if healthy else (previous or {}).get("healthy")
    entry = {"format": FORMAT, "step": step, "dir": name, "kind": kind or "single", "healthy": good}
    write_checked_json(root / LATEST, entry)
    steps = [p for s, p in _step_dirs(root) if s <= step]
    for old in steps[: max(0, len(steps) - keep)]:
        if old.name not in (name, good):
            shutil.rmtree(old, ignore_errors=True)


def snapshot(value: Any) -> Any:
    """``value`` with every tensor replaced by a copy in CPU memory and every container rebuilt: what a
    background write reads while training goes on mutating the originals."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((k, snapshot(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


class BackgroundSaver:
    """Writes checkpoints with :func:`save_checkpoint` in a background thread, one at a time.

    :meth:`submit` copies the state (:func:`snapshot`), first waiting for the write before it, so at
    most one copy is held and checkpoints commit in step order; the write's error, if any, is raised by
    the next :meth:`submit` or :meth:`wait`. A process that dies mid-write loses that checkpoint only:
    ``latest.json`` still names the one before, as after a synchronous save that was cut short.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, root: str | Path, step: int, model_state: dict[str, Tensor], state: dict[str, Any], *,
               keep: int = 2) -> Path:
        """Start writing a checkpoint of copies of ``model_state`` and ``state``; return its directory's path."""
        self.wait()
        model_copy, state_copy = snapshot(model_state), snapshot(state)

        def write() -> None:
            try:
                save_checkpoint(root, step, model_copy, state_copy, keep=keep)
            except BaseException as e:  # handed to the thread that waits
                self._error = e

        self._thread = threading.Thread(target=write, name="descend-checkpoint")
        self._thread.start()
        return Path(root) / f"step-{step:08d}"

    def wait(self) -> None:
        """Return once nothing is being written; raise the last write's error."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


def remove_temporaries(root: str | Path) -> list[Path]:
    """Remove what an interrupted save leaves in ``root`` (``.step-*`` directories, ``.*.tmp`` files)."""
    removed = []
    for p in Path(root).glob(".*"):
        if p.name.startswith(".step-") and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(".tmp") and (p.is_file() or p.is_symlink()):
            with contextlib.suppress(OSError):  # read-only: left for a later start
                p.unlink()
        else:
            continue
        if not (p.exists() or p.is_symlink()):
            removed.append(p)
    return removed


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-NNNNNNNN`` directory directly in ``root`` (no links), oldest first."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _read_latest(root: Path, quiet: bool = False) -> dict[str, Any] | None:
    """``latest.json``, validated: checksum, and ``dir`` names a step directory directly in ``root``."""
    try:
        entry = read_checked_json(root / LATEST, "checkpoint index")
        name = entry.get("dir")
        if not isinstance(name, str) or _STEP_DIR.fullmatch(name) is None:
            raise CheckpointError(f"checkpoint index {root / LATEST} names {name!r}, not a step-NNNNNNNN directory")
        if entry.get("step") != int(name[5:]) or entry.get("kind") not in ("single", "dcp"):
            raise CheckpointError(f"checkpoint index {root / LATEST} is malformed")
        healthy = entry.get("healthy")
        if healthy is not None and (not isinstance(healthy, str) or _STEP_DIR.fullmatch(healthy) is None):
            raise CheckpointError(f"checkpoint index {root / LATEST} names {healthy!r} as healthy")
        path = root / name
        if path.is_symlink() or (path.exists() and path.resolve().parent != root.resolve()):
            raise CheckpointError(
                f"checkpoint index {root / LATEST} names {name}, a symbolic link; "
                f"only directories inside {root} are read"
            )
        return entry
    except CheckpointError:
        if quiet:
            return None
        raise


def is_sharded(path: str | Path) -> bool:
    """True for a step directory whose manifest says torch.distributed.checkpoint wrote it.

    Decided by the (checksummed) manifest alone: a ``.metadata`` file planted beside a
    one-process checkpoint does not make it one.
    """
    try:
        return read_checked_json(Path(path) / MANIFEST, "checkpoint manifest").get("kind") == "dcp"
    except CheckpointError:
        return False


def latest_dir(root: str | Path) -> Path:
    """The verified step directory to resume from: the one ``root/latest.json`` names, or ``root``
    itself when it is a step directory.

    When ``latest.json`` names a checkpoint saved while unhealthy, the newest healthy one it
    records is used (with a :class:`CheckpointWarning`). When the index or the checkpoint fails
    verification, the newest step directory that verifies is used instead, with a
    :class:`CheckpointWarning`; the bad file or directory is renamed ``<name>.rejected`` (kept,
    never deleted) and ``latest.json`` is pointed at the good one. Raises :class:`CheckpointError`
    when nothing verifies.
    """
    root = Path(root)
    if not (root / LATEST).exists() and any((root / f).exists() for f in (MANIFEST, "state.json", ".metadata")):
        verify_step(root)
        return root
    if not root.is_dir() or not ((root / LATEST).exists() or _step_dirs(root)):
        raise CheckpointError(f"no checkpoint in {root} (expected {LATEST} or a step directory)")
    remove_temporaries(root)
    bad = root / LATEST
    try:
        entry = _read_latest(root)
        assert entry is not None
        want = entry.get("healthy") or entry["dir"]
        bad = root / want
        verify_step(bad, kind=entry["kind"])
        if want != entry["dir"]:
            _warn(
                f"checkpoint {root / entry['dir']} was saved while training was unhealthy; resuming from {want}, "
                "the newest healthy one (pass that step directory to resume from it anyway)"
            )
        _remove_incomplete(root, entry["step"])
        return bad
    except CheckpointError as e:
        reason = str(e)
    for step, path in reversed(_step_dirs(root)):
        if path == bad:
            continue
        try:
            manifest = verify_step(path)
        except CheckpointError:
            continue
        kept = ""
        try:  # best effort: a read-only run directory still resumes (or predicts) from the good one
            if bad.exists() or bad.is_symlink():
                aside = _aside(bad)
                bad.rename(aside)
                kept = f"; the bad one is kept as {aside.name}"
            entry = {"format": FORMAT, "step": step, "dir": path.name, "kind": manifest["kind"], "healthy": path.name}
            write_checked_json(root / LATEST, entry)
        except OSError as e:  # read-only, or another rank of the same job moved it first
            kept = kept or f" (nothing was moved: {e.strerror or e})"
        _warn(f"{reason}; resuming from {path.name}, the newest checkpoint that verifies{kept}")
        _remove_incomplete(root, step)
        return path
    raise CheckpointError(f"{reason}; no other checkpoint in {root} verifies")


def _remove_incomplete(root: Path, committed: int) -> None:
    """Remove step directories newer than the committed one that have no manifest: a multi-process
    save cut short (its manifest is written last). Each removal is reported in one line."""
    for step, path in _step_dirs(root):
        if step > committed and not (path / MANIFEST).exists():
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                _warn(f"removed {path}, a checkpoint whose save was cut short (it has no {MANIFEST})")


def _aside(path: Path) -> Path:
    aside, n = path.with_name(path.name + ".rejected"), 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{path.name}.rejected-{n}")
    return aside


def _warn(message: str) -> None:
    warnings.warn(" ".join(message.split()), CheckpointWarning, stacklevel=3)


def load_checkpoint(root: str | Path) -> Checkpoint:
    """Read the checkpoint :func:`latest_dir` picks under ``root`` (or ``root`` itself, a step directory).

    Every file is checked against the manifest before it is parsed, from the same bytes. Raises
    :class:`CheckpointError` naming the problem when anything is missing, corrupt or forged.
    """
    path = latest_dir(root)
    manifest = verify_step(path)  # verified by latest_dir: not hashed again unless a file changed since
    if manifest["kind"] == "dcp":
        raise CheckpointError(
            f"checkpoint {path} was written by several processes (torch.distributed.checkpoint); "
            "load it with Trainer.resume, which reads it at any world size"
        )
    data = {}
    for name in ("model.safetensors", "state.safetensors", "state.json"):
        raw = (path / name).read_bytes()
        if sha256_bytes(raw) != manifest["files"][name]["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} changed while it was read")
        data[name] = raw
    try:
        meta = json.loads(data["state.json"])
        if meta.get("format") != FORMAT or meta.get("step") != manifest["step"]:
            raise CheckpointError(f"checkpoint {path}: state.json disagrees with its manifest")
        model = load_safetensors(data["model.safetensors"])
        state = decode(meta["state"], load_safetensors(data["state.safetensors"]))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}") from e
    return Checkpoint(step=int(manifest["step"]), path=path, model=model, state=state)


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
