"""Compiling a native step and keeping it: the C compiler, the kernel cache, and the loaded :class:`Kernel`.

The C source is compiled once per machine with the system C compiler (``$CC``, split as a shell
splits it, else ``cc``) and cached by its hash under ``$DESCEND_CACHE_DIR`` (default
``~/.cache/descend/kernels``; never a directory other users can write to); a process that finds the
library there loads it only if its bytes match the SHA-256 sealed onto it when it was built.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from descend._io import atomic_write, umask_mode


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$DESCEND_CACHE_DIR`` or ``$XDG_CACHE_HOME/descend`` (``~/.cache``)."""
    root = os.environ.get("DESCEND_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "descend" / "kernels"


@functools.cache
def _machine_tag() -> str:
    """The CPU the kernels are built for (``-march=native``): its model and instruction-set flags."""
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.system()}|{text}"


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` split as a shell splits it (``CC="gcc -O2"``), else cc, gcc or clang."""
    configured = shlex.split(os.environ.get("CC", ""))
    if configured:
        return configured
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


#: IEEE arithmetic, no contraction into FMAs (the reference engine's roundings); -fno-trapping-math lets the
#: compiler compute both sides of a select (the 8-bit codes) and vectorise: no program of descend's enables
#: floating-point traps, and it changes no result.
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
#: Tried in order: this CPU's instruction set (full-width vectors on x86), then the portable build.
_TUNING = [["-march=native", "-mprefer-vector-width=512"] if platform.machine().lower() in ("x86_64", "amd64")
           else ["-mcpu=native"], []]
_lock = threading.Lock()
logger = logging.getLogger("descend.optim")


def _as_array(values: Sequence[Any], typecode: str) -> array.array:
    """``values`` as an ``array`` of ``typecode`` (``"q"`` int64, ``"d"`` double), as they are if they are one."""
    return values if isinstance(values, array.array) and values.typecode == typecode else array.array(typecode, values)


class Kernel:
    """A loaded native step: ``kernel(pointers, sizes, scalars)`` over ``count`` tensors."""

    def __init__(self, path: Path, pointers: int) -> None:
        self.library = ctypes.CDLL(str(path))
        self.function = self.library.descend_step
        self.function.restype = None
        self.function.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        self.pointers = pointers  # per tensor: w, g, then the state tensors
        self.seed_columns = pointers - 2  # per tensor: a seed per state tensor (and one for w if it is rounded)
        self.path = path

    def __call__(self, pointers: Sequence[int], sizes: Sequence[int], scalars: Sequence[float],
                 offsets: Sequence[int] | None = None, seeds: torch.Tensor | None = None,
                 counters: torch.Tensor | None = None) -> None:
        """Step ``len(sizes)`` tensors: ``pointers`` holds, per tensor, the addresses of ``w``, ``g`` and its
        state (contiguous, ``sizes[t]`` elements each); ``scalars`` the hyperparameters in trace order.

        With bfloat16 state or parameters: ``offsets[t]``, the flat index of tensor ``t``'s first element in
        what its rounding noise is drawn over, and ``seeds`` (int32 ``[count, seed_columns]``, contiguous) its
        seeds, per state tensor and then for ``w``.
        ``counters`` (a contiguous float32 or float64 CPU tensor: step counters) is incremented by 1
        first, in the same call.
        """
        if len(pointers) != self.pointers * len(sizes):
            raise ValueError(f"expected {self.pointers} pointers per tensor, got {len(pointers)} for {len(sizes)}")
        ptrs, counts = _as_array(pointers, "q"), _as_array(sizes, "q")
        values = _as_array(scalars or [0.0], "d")  # a chain without hyperparameters still passes one
        starts = _as_array(offsets, "q") if offsets is not None else None
        if seeds is not None and (seeds.dtype != torch.int32 or not seeds.is_contiguous()
                                  or seeds.numel() != len(counts) * self.seed_columns):
            raise ValueError("seeds must be a contiguous int32 tensor of one seed per tensor and state")
        wide = False
        if counters is not None:
            wide = counters.dtype == torch.float64
            if not (wide or counters.dtype == torch.float32) or not counters.is_contiguous() or not counters.is_cpu:
                raise ValueError("counters must be a contiguous float32 or float64 CPU tensor")
        self.function(len(counts), ptrs.buffer_info()[0], counts.buffer_info()[0], values.buffer_info()[0],
                      torch.get_num_threads(), starts.buffer_info()[0] if starts is not None else None,
                      seeds.data_ptr() if seeds is not None else None,
                      counters.data_ptr() if counters is not None else None,
                      counters.numel() if counters is not None else 0, wide)


def compile_kernel(source: str, pointers: int) -> Kernel:
    """Compile ``source`` (or load it from the cache) and return the kernel.

    A cached library is loaded only if its bytes match the SHA-256 written after them when it was
    built (:func:`_sealed`), and it exports the step; one that does not (truncated, damaged, from
    elsewhere) is built again, and the log says so once. A cache directory that is not this user's
    alone is not used (logged, with the reason), nor one that cannot be written to when a kernel must
    be stored there: the private directory under the temporary directory takes their place.

    Raises ``RuntimeError`` (one line, with the compiler's first error) when no C compiler works.
    """
    command = _compiler()
    if command is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    flags = [*_FLAGS, *(f for tuning in _TUNING for f in tuning)]
    key = "\0".join([_FORMAT, source, *command, *flags, _machine_tag()])
    name = f"step_{hashlib.sha256(key.encode()).hexdigest()[:24]}.so"
    with _lock:
        directories = list(_cache_directories())
        for directory in directories:
            kernel = _cached(directory / name, pointers)
            if kernel is not None:
                return kernel
        kernel, binary = _build(command, source, pointers)
        for directory in directories:
            try:
                atomic_write(directory / name, _sealed(binary), mode=umask_mode() & ~0o022)
                return kernel
            except OSError as err:  # e.g. a read-only cache: the next directory
                _log_once(f"descend: cannot store compiled kernels in {directory} ({err})")
        _log_once("descend: no cache directory can be written to; compiled kernels are rebuilt in each process")
        return kernel


#: Bumped when what the cache holds changes form (a library without the seal is never looked up).
_FORMAT = "sealed-1"
#: What precedes the hex SHA-256 of the library's bytes appended to each cached library.
_SEAL = b"\0descend-sha256:"
_SEAL_LENGTH = len(_SEAL) + 64
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def _sealed(binary: bytes) -> bytes:
    """The library as cached: its bytes, then the SHA-256 of those bytes (the loader ignores what
    follows the sections an ELF or Mach-O file describes)."""
    return binary + _SEAL + hashlib.sha256(binary).hexdigest().encode()


def _seal_broken(data: bytes) -> str | None:
    """Why a cached file is not the library that was built and sealed, or None if it is."""
    body, seal = data[:-_SEAL_LENGTH], data[-_SEAL_LENGTH:]
    if len(data) <= _SEAL_LENGTH or not seal.startswith(_SEAL):
        return "carries no record of what was built (truncated or not written by descend)"
    if hashlib.sha256(body).hexdigest().encode() != seal[len(_SEAL):]:
        return "does not match the SHA-256 recorded when it was built (damaged)"
    return None


def _cached(path: Path, pointers: int) -> Kernel | None:
    """The kernel at ``path`` if it is there, this user's alone and what was built; None otherwise (a
    present file that is not is logged, once)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        why: str | None = f"cannot be read ({err})"
    else:
        why = _refusal(path) or _seal_broken(data)
    if why is None:
        try:
            return Kernel(path, pointers)
        except (OSError, AttributeError) as err:  # not a library here, or one without the step
            why = f"does not load ({err})"
    _log_once(f"descend: the compiled kernel {path} {why}; building it again")
    return None


def _cache_directories() -> Iterator[Path]:
    """The cache directory, then a private one under the temporary directory; a directory this user does
    not own alone is skipped, and the log says why (once)."""
    user = os.getuid() if hasattr(os, "getuid") else os.getpid()
    for directory in (kernel_cache_dir(), Path(tempfile.gettempdir()) / f"descend-kernels-{user}"):
        why = _refusal(directory, create=True)
        if why is None:
            yield directory
        else:
            _log_once(f"descend: not keeping compiled kernels in {directory}: {why}")


def _refusal(path: Path, create: bool = False) -> str | None:
    """Why ``path`` cannot hold libraries this process loads, or None: it must belong to this user and no
    other user may write to it (a library loaded from there runs as this user). ``create``: make the
    directory (mode 0700) if it is missing."""
    try:
        if create and not path.exists():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = path.stat()
    except OSError as err:
        return f"it cannot be created or read ({err})"
    if hasattr(os, "getuid") and status.st_uid != os.getuid():
        return f"it belongs to user {status.st_uid}, not to this user"
    if status.st_mode & 0o022:
        return f"other users can write to it (mode {stat.S_IMODE(status.st_mode):o})"
    return None


def _build(command: list[str], source: str, pointers: int) -> tuple[Kernel, bytes]:
    """Compile ``source``; the kernel, loaded from what the compiler wrote, and the library's bytes."""
    with tempfile.TemporaryDirectory(prefix="descend-kernel-") as tmp:
        c_file, library = Path(tmp) / "step.c", Path(tmp) / "step.so"
        c_file.write_text(source)
        errors = ""
        # without OpenMP (e.g. clang lacking libomp) the loop runs on one thread
        for tuning, openmp in [(t, o) for t in _TUNING for o in (["-fopenmp"], [])]:
            try:
                result = subprocess.run([*command, *_FLAGS, *tuning, *openmp, str(c_file), "-o", str(library), "-lm"],
                                        capture_output=True, text=True)
            except OSError as err:  # the compiler is not there or cannot run
                raise RuntimeError(f"the C compiler {shlex.join(command)!r} cannot run ({err})") from err
            if result.returncode != 0:
                errors = errors or (result.stderr.strip().splitlines() or ["(no message)"])[0]
                continue
            binary = library.read_bytes()
            # named by its content: the loader takes a name it has loaded before for that library again
            loaded = library.rename(Path(tmp) / f"{hashlib.sha256(binary).hexdigest()}.so")
            try:
                return Kernel(loaded, pointers), binary
            except (OSError, AttributeError) as err:
                errors = errors or f"the library it built does not load ({err})"
    raise RuntimeError(f"the C compiler could not build a native optimizer step: {errors}")
