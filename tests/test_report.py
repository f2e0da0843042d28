"""The HTML report: self-contained (no external resources), every plot embedded, renders in Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from descend.report import comparison_table, render_report, write_report
from descend.train import CompareSpec, compare


@pytest.fixture(scope="module")
def results() -> dict:
    spec = CompareSpec(optimizers="sgd,adam", seeds=2, steps=20, sweep="1,3", sweep_steps=10, eval_every=5, width=16)
    return compare(spec)


def test_report_is_self_contained_with_decodable_plots(results, tmp_path) -> None:
    path = write_report(results, tmp_path / "report.html")
    text = path.read_text()
    assert not re.search(r'(src|href)="(https?:|//)', text)  # nothing fetched from elsewhere
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 4  # loss, val loss, val accuracy, LR sweep
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "<table>" in text and "Update equations" in text and "g ← ∇L(w)" in text


def test_table_ranks_by_mean_test_metric(results) -> None:
    rows = comparison_table(results)
    means = [results["optimizers"][r["optimizer"]]["test_mean"] for r in rows]
    assert means == sorted(means, reverse=True)
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert render_report(results).count("<tr>") == 1 + len(rows)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(results, tmp_path) -> None:
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    write_report(results, tmp_path / "report.html")
    script = Path(__file__).parents[1] / "benchmarks" / "report_screenshot.py"
    png = tmp_path / "shot.png"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "report.html"), str(png)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000  # not a blank page
