"""The process group: set up from torchrun's environment, rank helpers, metric reduction, launch, failures.

torchrun (``python -m torch.distributed.run``) starts one process per device and gives each
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`setup` reads
them; without them (a plain ``python`` run) it sets nothing up and every helper answers for a world
of one process, so the same script runs either way.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

#: Seconds a collective may wait for the other ranks before it fails (so a dead rank cannot hang a job).
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node), its device."""

    rank: int
    local_rank: int
    world_size: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def launched() -> bool:
    """True when this process was started by torchrun (``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup(backend: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group torchrun described, or do nothing outside torchrun.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (nccl on CUDA, gloo on CPU).
        timeout_s: how long any collective (and the rendezvous) waits for the other ranks before it
            raises; gloo applies it to every collective, NCCL aborts the communicator on it.

    Returns:
        The :class:`DistInfo` of this process. On CUDA the current device is set to ``LOCAL_RANK``.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    backend = backend or default_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (auto), got {backend!r}")
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA; use backend='gloo' (or None) on CPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not launched():
        return DistInfo(0, 0, 1, None, device)
    die_with_parent(signal.SIGKILL)  # an orphaned rank must not keep training
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return info()


def teardown() -> None:
    """Leave the process group (no-op when none is set up), after a barrier.

    The barrier makes the ranks tear their connections down together: a rank that destroys its
    group while a peer still talks to it can crash at exit (gloo's worker threads).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_AVAILABLE = dist.is_available()


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return _AVAILABLE and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``, 0 outside torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on rank 0: the one process that logs, prints and writes files other than checkpoints."""
    return rank() == 0


def device() -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` under NCCL, else CUDA if present, else CPU."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            return torch.device("cuda", local_rank())
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def info() -> DistInfo:
    """The :class:`DistInfo` of this process."""
    backend = str(dist.get_backend()) if is_distributed() else None
    return DistInfo(rank(), local_rank(), world_size(), backend, device())


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Elementwise sum of ``values`` over ranks, in float64 (every rank passes the same length)."""
    if not (is_distributed() and world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself outside a process group.

    Use it where ranks could disagree, e.g. on a default output directory named after the time.
    """
    if not (is_distributed() and world_size() > 1):
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_metrics(metrics: Mapping[str, float | torch.Tensor], count: float = 1.0) -> dict[str, float]:
    """Average metrics over ranks, each rank weighted by the examples it measured them on.

    ``out[k] = sum_r count_r * metrics_r[k] / sum_r count_r``: with per-rank means of a loss over
    ``count_r`` examples this is the mean over all examples. Every rank must call it with the same
    keys (the order does not matter). A world of one returns the metrics as floats.

    Args:
        metrics: name -> value (a number or a 0-d tensor) on this rank.
        count: the number of examples behind this rank's values (>= 0).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    keys = sorted(metrics)
    values = [float(metrics[k]) for k in keys]
    sums = all_reduce_sum([count * v for v in values] + [float(count)])
    total = sums[-1]
    if total == 0:
        return {k: float("nan") for k in keys}
    return {k: s / total for k, s in zip(keys, sums[:-1])}


def entrypoint(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a distributed ``main`` so that a failing rank says who it is and ends the job.

    On an exception this prints ``descend: rank R failed: Type: message`` to stderr, records the
    error for torchrun's failure summary (:func:`torch.distributed.elastic.multiprocessing.errors.record`)
    and re-raises, so the process exits non-zero; torchrun then stops the other ranks.

    Under torchrun a ``main`` that returns ends the process there: the process group is torn down
    (:func:`teardown`, if ``main`` has not done it), ``atexit`` handlers run, output is flushed, and
    the process exits with ``main``'s return value if it is an ``int`` (else 0) *without* the
    interpreter's finalisation. gloo keeps C++ worker threads that can abort the process
    (``terminate called without an active exception``, SIGABRT) when the interpreter's shutdown
    frees the model that still holds the process group, which would turn a finished job into a
    failed one. Outside torchrun the decorated function returns normally.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> T:
        try:
            result = fn(*args, **kwargs)
        except SystemExit as e:
            if e.code not in (0, None):
                print(f"descend: rank {rank()} failed: exit code {e.code}", file=sys.stderr, flush=True)
            raise
        except BaseException as e:
            print(f"descend: rank {rank()} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise
        if launched():
            teardown()
            exit_now(result if type(result) is int else 0)
        return result

    return record(guarded)


def exit_now(code: int = 0) -> NoReturn:
    """End the process with ``code`` after ``atexit`` handlers and a flush, skipping interpreter finalisation."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """End this process with ``sig`` when its parent process dies (a launcher killed by SIGKILL, say).

    On Linux the kernel delivers ``sig`` (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread
    watches the parent's pid and sends ``sig`` to this process once it changes. ``parent``: the pid
    the parent is expected to have (default: the current parent); if it is already gone, ``sig``
    comes at once. Safe to call more than once, and in a ``preexec_fn`` between fork and exec.
    """
    parent = os.getppid() if parent is None else parent
    prctl = _prctl()
    if prctl is not None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
            if os.getppid() != parent:  # died before the signal was armed
                os.kill(os.getpid(), sig)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="descend-parent-watch", daemon=True).start()


@functools.cache
def _prctl() -> Any:
    """libc's ``prctl`` on Linux (looked up once, so a forked child need not load anything), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def torchrun_command(nproc: int, argv: Sequence[str], *, master_port: int | None = None,
                     extra: Sequence[str] = ()) -> list[str]:
    """The ``python -m torch.distributed.run`` command that starts ``nproc`` local processes of ``argv``.

    ``argv`` is what follows torchrun's options: ``["script.py", ...]`` or ``["-m", "descend", "train", ...]``.
    Without ``master_port`` the rendezvous is ``--standalone`` (a free port is picked).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if not argv:
        raise ValueError("argv is empty; pass the script (or -m module) and its arguments")
    rendezvous = ["--standalone"] if master_port is None else ["--master_addr=127.0.0.1",
                                                                 f"--master_port={master_port}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *rendezvous, *extra, *argv]


def launch(nproc: int, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
           timeout_s: float | None = None, master_port: int | None = None) -> int:
    """Run ``argv`` on ``nproc`` local processes through torchrun and return its exit code.

    The processes inherit stdout/stderr. ``OMP_NUM_THREADS`` defaults to ``cpus // nproc`` so the
    processes do not oversubscribe the CPU. A failed rank makes torchrun stop the others and exit
    non-zero with a summary naming the rank. If this process dies, however it dies, torchrun and
    every rank end too (:func:`die_with_parent`): nothing keeps writing into the run directory.

    Args:
        nproc: processes on this node (one per GPU on a GPU machine).
        argv: ``["script.py", args...]`` or ``["-m", "package", args...]``.
        env: extra environment variables for the processes.
        timeout_s: stop the job after this many seconds (``subprocess.TimeoutExpired`` is raised).
        master_port: a fixed rendezvous port instead of ``--standalone``.
    """
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    full_env.update(env or {})
    me = os.getpid()
    _prctl()  # looked up here: between fork and exec the child only calls it
    # If this process dies (even by SIGKILL), torchrun gets SIGTERM and stops its ranks; each rank
    # also dies with torchrun (setup()), so no process of the job outlives the one that launched it.
    preexec = (lambda: die_with_parent(signal.SIGTERM, me)) if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(torchrun_command(nproc, argv, master_port=master_port), env=full_env, preexec_fn=preexec)
    try:
        return proc.wait(timeout=timeout_s)
    except BaseException:  # timeout or Ctrl-C: SIGTERM lets torchrun stop its workers before it exits
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
