"""A process's memory, measured: its resident set and the peak of it, and a child process capped so that a
model too large for the machine fails inside the child instead of exhausting the machine (Linux; elsewhere
the functions degrade as their docstrings say)."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable

__all__ = ["address_space_cap", "available_memory", "mmap_large_allocations", "peak_resident_bytes",
           "reset_peak", "resident_bytes"]


def _status_bytes(field: str) -> int | None:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; ``None`` where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int:
    """This process's resident set now (``VmRSS``); its peak over its whole life where the system has no
    ``/proc``."""
    now = _status_bytes("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_resident_bytes() -> int:
    """This process's peak resident set since the last :func:`reset_peak` (``VmHWM``); the peak of its whole
    life where the system has no ``/proc``."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Reset :func:`peak_resident_bytes` to the resident set now (writing 5 to ``/proc/self/clear_refs``);
    without ``/proc`` nothing is reset."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def available_memory(default: int) -> int:
    """Bytes the system could give a new process now (``MemAvailable``), or ``default`` where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return default


def address_space_cap(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` for :mod:`subprocess` that caps the child's address space at ``limit`` bytes
    (``RLIMIT_AS``): an allocation past it fails in the child (torch raises ``RuntimeError``) instead of
    taking memory from the machine. Where the system has no such limit the child runs uncapped."""

    def cap() -> None:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return cap


def mmap_large_allocations() -> None:
    """Make glibc serve every allocation over 64 KiB by ``mmap`` and return it on free, so the resident set
    follows the live tensors and its peak measures them (glibc otherwise keeps freed blocks of up to 32 MiB
    in its heap). Does nothing where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixing it also stops glibc raising it after frees)
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
