"""Atomic, durable file writes: the one writer every file descend produces goes through.

A write goes to a temporary file in the target's directory, is flushed and ``fsync``-ed, gets the
permissions a plain ``open()`` would give under the current umask (``0o644`` under umask ``022``),
and then replaces the target with ``os.replace``; the directory is ``fsync``-ed afterwards so the
rename itself survives a power cut. Readers see the old file or the new one, never a half-written
one; a failure (disk full, permission denied) leaves the old file in place and no temporary behind.
An ``OSError`` names the target path, never the temporary: a target that is a directory is an
``IsADirectoryError``, a target whose directory does not exist a ``FileNotFoundError`` (a file in its
place: ``NotADirectoryError``), each raised
before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write", "fsync_dir", "umask_mode", "write_json"]


def umask_mode(base: int = 0o666) -> int:
    """``base`` with the process umask applied (``os.umask`` can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries to disk (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it atomically becomes ``path``.

    For writers that take a file name (``safetensors.save_file``, ``matplotlib.savefig``)::

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(tensors, tmp)

    ``suffix`` keeps an extension some writers dispatch on (``".png"``). ``mode``: the file's permissions
    (default: what ``open()`` gives under the umask).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{path.parent} is a file, not a directory", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"the directory {path.parent} does not exist", str(path))
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix + ".tmp")
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename == str(tmp):
            raise _naming(e, path) from None
        raise
    fsync_dir(path.parent)


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` as the same kind of error about ``path``: a message names the user's file, never the temporary."""
    renamed = type(error)(error.errno, error.strerror, str(path))
    renamed.__dict__.update(error.__dict__)  # e.g. bytes_needed
    return renamed


def atomic_write(path: str | Path, data: bytes | str | Callable[[Any], None], *, encoding: str = "utf-8",
                 mode: int | None = None) -> Path:
    """Write ``data`` (bytes, text, or a function given the open binary file) to ``path`` atomically
    (``mode``: as :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
        f.flush()
    return path


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, allow_nan: bool = True) -> Path:
    """``obj`` as JSON (UTF-8, trailing newline), atomically. Paths, numpy and torch scalars/arrays are
    converted; ``allow_nan=False`` refuses non-finite floats (Python's ``json`` reads ``Infinity`` back)."""
    return atomic_write(path, json.dumps(obj, indent=indent, allow_nan=allow_nan, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
