"""Byte-level text: your own text files, and the Python standard library's sources (a corpus every installation ships).

**Your own text** (:func:`load_text_files`): a file, or every text file under a directory (sorted by
relative path; hidden files and folders, and files that are not text, are left out), read as bytes
(vocabulary 256, no tokenizer to download). The files are laid end to end and cut into three
contiguous spans: validation and test each take ``eval_fraction`` of the bytes at the end, train the
rest, so no text is in two splits. Each span is cut into non-overlapping windows of ``context + 1``
bytes that never cross a file boundary; an example is ``inputs = c[:-1]``, ``targets = c[1:]``.
The splits are :class:`ByteWindows` datasets that read each window from disk when asked for it, so a
corpus larger than memory is never read whole (it is read once, in pieces, to check that it is text
and to record its SHA-256).

**The standard library** (:func:`load_stdlib_text`):

The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (not ``site-packages``/``dist-packages``
nor the ``test``/``tests``/``idle_test`` packages) are listed in sorted order, shuffled by a
generator seeded with ``seed``, and handed out *by file*: to validation until it holds
``val_bytes``, then to test, then to train until ``train_bytes`` (so no file is split between
splits). Each split's files are joined and cut into non-overlapping windows of ``context + 1``
bytes ``c``; an example is ``inputs = c[:-1]``, ``targets = c[1:]`` (``[M, context]`` int64 each),
so a causal model predicts every next byte. The vocabulary is the 256 byte values.

The corpus depends on the Python version that is running (its standard library); ``info`` records
that version, the files and bytes per split and a SHA-256 of the bytes, so a result can name the
exact text it was measured on.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import os
import platform
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from descend._random import generator
from descend.data._base import DataBundle, Split
from descend.data.tabular import DataError

__all__ = ["ByteWindows", "load_stdlib_text", "load_text_files", "stdlib_files", "text_files"]

_READ = 1 << 20  # bytes read at a time when checking a file

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@lru_cache(maxsize=4)
def stdlib_files(root: str | None = None) -> tuple[Path, ...]:
    """The standard library's ``.py`` files (sorted by relative path), less third-party and test packages."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"the standard library directory {base} does not exist")
    files = []
    for directory, subdirs, names in os.walk(base):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]  # prune: never walk site-packages or tests
        files += [Path(directory, n) for n in names if n.endswith(".py")]
    return tuple(sorted(files, key=lambda p: p.relative_to(base).as_posix()))


def _windows(data: bytes, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(data) // (context + 1)
    if n == 0:
        raise ValueError(f"a split holds {len(data)} bytes, fewer than one window of {context + 1}")
    chunks = torch.frombuffer(bytearray(data[: n * (context + 1)]), dtype=torch.uint8).view(n, context + 1).long()
    return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()


def load_stdlib_text(seed: int = 0, *, context: int = 64, train_bytes: int = 1_000_000, val_bytes: int = 24_000,
                     test_bytes: int = 24_000, max_file_bytes: int = 60_000, root: str | None = None) -> DataBundle:
    """The byte-level language-modelling set described in the module docstring.

    ``max_file_bytes`` skips files larger than that (a few generated tables), so one file cannot fill
    a split. Classification over 256 classes at every position: ``targets [M, context]``.
    """
    if context < 1 or min(train_bytes, val_bytes, test_bytes) <= context:
        raise ValueError(f"need context >= 1 and every split larger than one window, got context={context}")
    files = stdlib_files(root)
    order = torch.randperm(len(files), generator=generator(seed)).tolist()
    budgets = {"val": val_bytes, "test": test_bytes, "train": train_bytes}
    parts: dict[str, list[bytes]] = {k: [] for k in budgets}
    names_of: dict[str, list[str]] = {k: [] for k in budgets}
    base = Path(root or sysconfig.get_paths()["stdlib"])
    counts = dict.fromkeys(budgets, 0)
    names = iter(budgets)
    current = next(names)
    for i in order:
        data = files[i].read_bytes()
        if not data or len(data) > max_file_bytes:
            continue
        parts[current].append(data)
        names_of[current].append(files[i].relative_to(base).as_posix())
        counts[current] += len(data)
        if counts[current] >= budgets[current]:
            current = next(names, "")
            if not current:
                break
    if current:
        raise ValueError(f"the standard library at {files[0].parent} holds too little text for the requested splits")
    joined = {k: b"".join(v)[: budgets[k]] for k, v in parts.items()}
    splits = {k: Split((x,), y) for k, (x, y) in ((k, _windows(v, context)) for k, v in joined.items())}
    digest = hashlib.sha256(b"".join(joined[k] for k in ("train", "val", "test"))).hexdigest()
    return DataBundle(
        name="stdlib-text",
        task="classification",
        input_kind="tokens",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        out_features=256,
        info={
            "context": context,
            "vocab": 256,
            "python": platform.python_version(),
            "files": {k: len(v) for k, v in parts.items()},
            "file_names": names_of,
            "bytes": {k: len(v) for k, v in joined.items()},
            "sha256": digest,
            "seed": seed,
        },
    )


class ByteWindows(Dataset):
    """Non-overlapping windows of ``context + 1`` bytes over byte ranges of files, read from disk on demand.

    ``spans`` are ``(path, start, stop)`` byte ranges; each holds ``(stop - start) // (context + 1)``
    windows (a shorter tail is left out, so no window crosses a file boundary). Item ``i`` is
    ``(inputs [context], targets [context])``, int64, ``targets`` the inputs shifted by one byte.
    """

    def __init__(self, spans: list[tuple[Path, int, int]], context: int) -> None:
        self.spans, self.context = [(Path(p), a, b) for p, a, b in spans], context
        counts = [max(0, (b - a) // (context + 1)) for _, a, b in self.spans]
        self.ends = np.cumsum(counts).tolist()  # windows up to and including each span
        self._files: dict[Path, int] = {}

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.ends else 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        k = bisect.bisect_right(self.ends, index)
        path, start, _ = self.spans[k]
        first = self.ends[k - 1] if k else 0
        size = self.context + 1
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        chunk = os.pread(fd, size, start + (index - first) * size)
        window = torch.frombuffer(bytearray(chunk), dtype=torch.uint8).long()
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:  # open files do not travel to other processes
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def _check_text(path: Path) -> tuple[int, str, str | None]:
    """``(bytes, sha256, why_not_text)``: read once in pieces; text is UTF-8 without NUL bytes."""
    digest, decoder, size = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), 0
    why = None
    with open(path, "rb") as f:
        while piece := f.read(_READ):
            digest.update(piece)
            if why is None:
                nul = piece.find(b"\0")
                if nul >= 0:
                    why = f"byte {size + nul} is a NUL byte (a binary file?)"
                else:
                    try:
                        decoder.decode(piece)
                    except UnicodeDecodeError as e:
                        why = f"the bytes at offset {size + e.start} are not UTF-8"
            size += len(piece)
    if why is None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            why = "it ends inside a UTF-8 character"
    return size, digest.hexdigest(), why


def text_files(path: str | Path) -> list[Path]:
    """``path`` if it is a file, else the files under the directory ``path`` (sorted; no hidden ones)."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{str(root)!r} does not exist: give a text file or a directory of text files")
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [Path(directory, n) for n in names if not n.startswith(".") and Path(directory, n).is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_text_files(path: str | Path, *, context: int = 64, eval_fraction: float = 0.05) -> DataBundle:
    """The byte-level language-modelling set of the module docstring, from a text file or a directory.

    A single file that is empty or not text raises :class:`~descend.data.tabular.DataError`; in a
    directory such files are left out (``info["skipped"]`` names them) and it is an error only when no
    text is left. ``info`` lists every file used with its size and SHA-256, and each split's byte
    ranges. Every split must hold at least one window of ``context + 1`` bytes.
    """
    if context < 1:
        raise DataError(f"context={context}: must be >= 1")
    if not 0 < eval_fraction < 0.5:
        raise DataError(f"eval_fraction={eval_fraction}: must be in (0, 0.5)")
    root = Path(path)
    single = root.is_file()
    files, skipped = [], {}
    for file in text_files(root):
        size, digest, why = _check_text(file)
        why = why or ("it is empty" if size == 0 else None)
        if why is not None:
            if single:
                raise DataError(f"{str(file)!r} is not a text file descend can train on: {why}")
            skipped[file.relative_to(root).as_posix()] = why
            continue
        files.append((file, size, digest))
    if not files:
        raise DataError(f"no text files under {str(root)!r} (hidden files and folders are left out)")
    total = sum(size for _, size, _ in files)
    held_out = int(total * eval_fraction)
    bounds = {"train": (0, total - 2 * held_out), "val": (total - 2 * held_out, total - held_out),
              "test": (total - held_out, total)}
    spans: dict[str, list[tuple[Path, int, int]]] = {k: [] for k in bounds}
    offset = 0
    for file, size, _ in files:  # each split's piece of each file, as a byte range of that file
        for name, (lo, hi) in bounds.items():
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                spans[name].append((file, a - offset, b - offset))
        offset += size
    splits = {name: ByteWindows(s, context) for name, s in spans.items()}
    for name, split in splits.items():
        if len(split) == 0:
            need = int((context + 1) / eval_fraction) + 1
            raise DataError(
                f"{str(root)!r} holds {total} bytes of text, too few for a {name} window of {context + 1} bytes "
                f"with {eval_fraction:g} of the bytes held out for validation and for test: give at least {need} "
                f"bytes, or a smaller context"
            )
    name_of = (lambda f: f.name) if single else (lambda f: f.relative_to(root).as_posix())
    return DataBundle(
        name=root.name,
        task="classification",
        input_kind="tokens",
        train=splits["train"],  # type: ignore[arg-type]
        val=splits["val"],  # type: ignore[arg-type]
        test=splits["test"],  # type: ignore[arg-type]
        out_features=256,
        info={
            "context": context,
            "vocab": 256,
            "path": str(root),
            "files": [{"name": name_of(f), "bytes": size, "sha256": digest} for f, size, digest in files],
            "skipped": skipped,
            "bytes": {name: sum(b - a for _, a, b in s) for name, s in spans.items()},
            "windows": {name: len(split) for name, split in splits.items()},
            "spans": {name: [[name_of(f), a, b] for f, a, b in s] for name, s in spans.items()},
        },
    )
