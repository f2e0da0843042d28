"""`descend experiments`: the CLI runs an experiment through descend.experiments.run and refuses bad names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _descend(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "descend", *args], capture_output=True, text=True, timeout=300)


def test_unknown_experiment_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _descend("experiments", "no-such-claim", "--out", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown experiment 'no-such-claim'" in lines[0] and "gd-vs-sgd" in lines[0]
    assert "Traceback" not in result.stderr


def test_experiment_writes_its_figure_and_numbers(tmp_path: Path) -> None:
    result = _descend("experiments", "adam-softsign", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    numbers = json.loads((tmp_path / "adam-softsign.json").read_text())
    assert (tmp_path / "adam-softsign.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert numbers["quick"] is True and "finding" in numbers
    assert "adam-softsign" in result.stdout and numbers["finding"]
