"""The memory benchmark runs end to end on a small model; its byte split adds up and matches the tensors'
sizes worked out by hand; the docs render the committed result."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory.py"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_splits_the_peak_into_parts_that_add_up(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    rows = "torch AdamW;descend AdamW, float32 state, step in backward;descend AdamW, int8 state"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--table", "--sizes", "100k", "--rows", rows,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    table = report["table"]
    measured = {r["row"]: r for r in table["rows"]}
    assert set(measured) == {"torch AdamW", "descend AdamW, float32 state, step in backward",
                             "descend AdamW, int8 state"}
    torch_row = measured["torch AdamW"]
    n = torch_row["parameters"]
    assert torch_row["vs_torch_adamw"] == 1.0
    for r in (torch_row, measured["descend AdamW, float32 state, step in backward"]):
        assert r["fits"] and r["size"] == "100k" and r["parameters"] == n
        parts = r["parameter_bytes"] + r["gradient_bytes"] + r["state_bytes"] + r["rest_bytes"]
        assert parts == r["peak_bytes"] - r["baseline_bytes"]
        assert r["parameter_bytes"] == 4 * n  # float32 weights
        # AdamW keeps two float32 moments per parameter and a step count per tensor (torch: a float32 scalar)
        assert 8 * n <= r["state_bytes"] <= 8 * n + 4 * 64
        assert r["state_bytes_per_parameter"] == pytest.approx(
            (r["parameter_bytes"] + r["gradient_bytes"] + r["state_bytes"]) / n)
        assert r["rest_bytes"] > -(2**20)  # a page-level difference at most: nothing counted twice
    assert torch_row["gradient_bytes"] == 4 * n  # every gradient alive when the step runs
    in_backward = measured["descend AdamW, float32 state, step in backward"]
    assert in_backward["gradient_bytes"] == 4 * 256 * 64  # one at a time: the largest, the 256 x 64 embedding
    assert in_backward["state_bytes_per_parameter"] < torch_row["state_bytes_per_parameter"]
    int8 = measured["descend AdamW, int8 state"]
    assert int8["fits"] if int8["available"] else int8["reason"].startswith("not available in this build")
    assert {t["row"] for t in table["targets"]} <= set(measured) | {"descend AdamW, int8 state, step in backward",
                                                                     "descend Lion, bfloat16 params, int8 state, "
                                                                     "step in backward"}


def test_docs_render_every_part_of_the_committed_result() -> None:
    hooks = _hooks()
    report = json.loads((ROOT / "benchmarks" / "results" / "memory.json").read_text())
    table = hooks.memory("memory.json")
    for r in report["table"]["rows"]:
        assert f"| {r['row']} |" in table
        if r.get("fits"):
            assert f"| {r['state_bytes_per_parameter']:.2f} |" in table
    targets = hooks.memory_targets("memory.json")
    lines = [line for line in targets.splitlines() if line.startswith("| ")]
    assert len(lines) == len(report["table"]["targets"]) + 1  # the header and one line per target
    assert "memory.json" in hooks.memory_two_billion("memory.json")
    assert "memory.json" in hooks.memory_quality("memory.json")
