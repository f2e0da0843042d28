"""The optimizer-step benchmark runs end to end on a small problem and reports what the README's tables show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_step.py"


def test_small_run_reports_both_layouts_and_the_reference(tmp_path: Path) -> None:
    """In a subprocess: the benchmark sets process-wide state (threads, malloc, warning filters)."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--params", "20K", "--tensors", "5", "--steps", "3",
                           "--warmup", "1", "--engines", "foreach", "--only", "AdamW [,Lion [", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| descend AdamW [foreach, flat] |" in done.stdout
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert {"descend AdamW [foreach]", "descend AdamW [foreach, flat]", "descend Lion [foreach, flat]",
            "torch AdamW [fused]"} <= set(rows)
    assert rows["torch AdamW [fused]"]["vs_torch_fused_adamw"] == 1.0
    flat = rows["descend AdamW [foreach, flat]"]
    assert flat["flat"] and flat["state_bytes_per_param"] == 8.0 and flat["ms"] > 0
    assert report["params"] == 20_000 and report["stream_gb_per_s"]["triad"] > 0
