"""Every script in examples/ runs to the end, shrunk to seconds by ``DESCEND_EXAMPLE_QUICK=1``.

Each runs as a user would run it, ``python examples/NAME.py``, in its own process and in a scratch
directory (so whatever it writes lands there). The torchrun example starts several processes and is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SLOW = {"ddp_torchrun.py"}  # starts processes under torchrun: start-up alone takes seconds per rank


def _params() -> list:
    return [
        pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in SLOW else [])
        for p in sorted(EXAMPLES.glob("*.py"))
    ]


def test_there_are_examples() -> None:
    assert len(list(EXAMPLES.glob("*.py"))) >= 2


@pytest.mark.parametrize("script", _params())
def test_example_runs(script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DESCEND_EXAMPLE_QUICK": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result.stdout.strip(), f"{script.name} printed nothing"
