"""The comparison report: tables that say what the seeds support, a self-contained HTML file, and a render check."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from descend.report import COLOURS, markdown_tables, render_report, summary_table, task_table, write_report
from descend.train import CompareSpec, compare


@pytest.fixture(scope="module")
def results() -> dict:
    spec = CompareSpec(task="digits-mlp", optimizers="sgd,signum,adam", seeds=3, tune_seeds=1, steps=30)
    return compare(spec)


def test_task_table_follows_the_tie_groups_and_explains_ties(results) -> None:
    task = results["tasks"]["digits-mlp"]
    rows = task_table(task)
    assert [r["optimizer"] for r in rows] == [n for g in task["ranking"] for n in g["members"]]
    for group in task["ranking"]:
        labels = {r["rank"] for r in rows if r["optimizer"] in group["members"]}
        assert labels == ({f"{group['rank']}="} if len(group["members"]) > 1 else {str(group["rank"])})
    for row in rows:
        seeds = int(row["reached"].split("/")[1])
        assert seeds == 3 and "±" in row["test accuracy (95% CI)"]
        assert row["steps to target"] == "–" or float(row["steps to target"]).is_integer()  # a median of steps
    summary = summary_table(results)
    assert [r["optimizer"] for r in summary] == ["sgd", "signum", "adam"]
    assert all(r["digits-mlp"].rstrip("=").isdigit() for r in summary)


def test_palette_is_okabe_ito_and_every_optimizer_has_its_own_colour() -> None:
    okabe_ito = {"#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#999999"}
    assert len(set(COLOURS.values())) == len(COLOURS)
    assert len(set(COLOURS.values()) - okabe_ito) <= 1  # signsgd: Okabe-Ito yellow, darkened for white paper


def test_report_explains_its_columns_and_keeps_the_equations(results) -> None:
    text = render_report(results)
    for phrase in ("Performance profile", "Columns of the task tables", "95% Student-t", "Update equations"):
        assert phrase in text
    assert text.count("<table ") == 2  # the summary and one task


def test_markdown_tables_carry_the_conditions_and_every_row(results) -> None:
    text = markdown_tables(results)
    env = results["environment"]
    assert env["date"] in text and f"seeds 0-{results['plan']['seeds'] - 1}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == (1 + 3) + (1 + 3)  # summary and digits-mlp: a header and one row per optimizer each


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
