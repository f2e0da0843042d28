"""Shared by the distributed test files: the subprocess environment, a killable runner, a state diff."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

#: One OpenMP thread per process: the torchrun jobs run 2 ranks on a 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run a command; (exit code, stdout+stderr, seconds). Kills its process group on timeout."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args[:6])} ... did not finish within {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out, time.perf_counter() - start


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
