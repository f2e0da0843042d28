"""Byte-level text from the Python standard library's own sources: a corpus every installation ships.

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

import hashlib
import os
import platform
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

from descend._random import generator
from descend.data._base import DataBundle, Split

__all__ = ["load_stdlib_text", "stdlib_files"]

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


def load_stdlib_text(
    seed: int = 0,
    *,
    context: int = 64,
    train_bytes: int = 1_000_000,
    val_bytes: int = 24_000,
    test_bytes: int = 24_000,
    max_file_bytes: int = 60_000,
    root: str | None = None,
) -> DataBundle:
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
