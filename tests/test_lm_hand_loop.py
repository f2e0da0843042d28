"""benchmarks/lm_hand_loop.py: its time to a target against hand-computed values, and its docs table
against the result file it renders."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module(path: Path, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_to_target_is_linear_in_time_between_evaluations() -> None:
    bench = _module(ROOT / "benchmarks" / "lm_hand_loop.py", "lm_hand_loop")
    rows = [{"seconds": 10.0, "val_loss": 4.0}, {"seconds": 20.0, "val_loss": 3.0}, {"seconds": 30.0, "val_loss": 2.0}]
    assert bench.time_to(rows, 3.5) == pytest.approx(15.0)
    assert bench.time_to(rows, 2.0) == pytest.approx(30.0)
    assert bench.time_to(rows, 5.0) == pytest.approx(10.0)  # reached at the first evaluation
    with pytest.raises(ValueError, match="never reached"):
        bench.time_to(rows, 1.0)


def test_docs_table_reproduces_the_committed_result() -> None:
    hooks = _module(ROOT / "docs" / "hooks.py", "descend_docs_hooks_lm")
    data = hooks.load_result("lm_hand_loop.json")
    table = hooks.lm_hand_loop(None)
    assert f"**{data['ratio']:.3f}**" in table and f"{data['parameters'] / 1e6:.1f}M parameters" in table
    for loop, runs in data["curves"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {loop} |"))
        assert f"{runs[0][-1]['val_loss'] / math.log(2):.3f}" in row
        assert f"{data['mean_seconds_to_target'][loop]:.1f}" in row
    assert data["ratio"] == pytest.approx(
        data["mean_seconds_to_target"]["descend train"] / data["mean_seconds_to_target"]["hand loop"])
