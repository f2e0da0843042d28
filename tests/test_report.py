"""The comparison report: tables that say what the seeds support, a self-contained HTML file, and a render check."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.text import Text

from descend._options import OPTIMIZER_NAMES
from descend.compare import CompareSpec, compare
from descend.compare._compare import summarise
from descend.report import (
    COLOURS,
    DASHES,
    curves_figure,
    markdown_tables,
    render_report,
    style_of,
    summary_table,
    swatch,
    task_table,
    write_outputs,
    write_report,
)

OKABE_ITO = {"#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#999999"}


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


def test_every_registered_optimizer_has_its_own_okabe_ito_colour_and_its_own_dash() -> None:
    styles = {name: style_of(name) for name in OPTIMIZER_NAMES}
    colours = [s["color"] for s in styles.values()]
    dashes = [DASHES[name] for name in OPTIMIZER_NAMES]
    assert len(set(colours)) == len(OPTIMIZER_NAMES), "two optimizers share a colour"
    assert len(set(dashes)) == len(OPTIMIZER_NAMES), "two optimizers share a dash pattern"
    assert len(set(colours) - OKABE_ITO) <= 1  # softsign: Okabe-Ito yellow, darkened for white paper
    assert set(COLOURS) == set(DASHES) == set(OPTIMIZER_NAMES)
    quick = ("sgd", "momentum", "signum", "adam")  # the quick suite: not both of Okabe-Ito's blues
    assert len({"#56B4E9", "#0072B2"} & {COLOURS[n] for n in quick}) <= 1


def _strokes(svg: str) -> dict[str, tuple[float, ...]]:
    """Colour -> dash pattern in units of the line width, of every stroked path or line of an SVG."""
    found = {}
    for style in re.findall(r'style="([^"]*stroke:[^"]*)"', svg):
        props = dict(p.split(":", 1) for p in (x.strip() for x in style.split(";")) if ":" in p)
        props = {k.strip(): v.strip() for k, v in props.items()}
        width = float(props.get("stroke-width", "1"))
        dash = props.get("stroke-dasharray", "none")
        pattern = () if dash == "none" else tuple(round(float(d) / width, 3) for d in re.split(r"[ ,]+", dash))
        found.setdefault(props["stroke"].lower(), pattern)
    return found


def _swatch_stroke(name: str) -> tuple[str, tuple[float, ...]]:
    line = swatch(name)
    colour = re.search(r'stroke="([^"]+)"', line).group(1).lower()
    width = float(re.search(r'stroke-width="([^"]+)"', line).group(1))
    dash = re.search(r'stroke-dasharray="([^"]+)"', line)
    return colour, () if dash is None else tuple(round(float(d) / width, 3) for d in dash.group(1).split(","))


def test_table_swatches_draw_the_colour_and_dash_of_the_plotted_curves(results) -> None:
    task = results["tasks"]["digits-mlp"]
    buffer = io.StringIO()
    curves_figure(task, "val_accuracy", "validation accuracy").savefig(buffer, format="svg")
    plotted = _strokes(buffer.getvalue())
    for name in task["optimizers"]:
        colour, pattern = _swatch_stroke(name)
        assert colour in plotted, f"{name}: no curve drawn in the swatch's colour {colour}"
        assert plotted[colour] == pattern, f"{name}: swatch dashes {pattern}, curve dashes {plotted[colour]}"
        assert swatch(name) in render_report(results)


def _converging(names: list[str]) -> dict:
    """A task whose curves all end at the same validation accuracy."""
    history = lambda k: [{"step": s, "val_accuracy": 0.5 + 0.4 * s / 100 + 0.01 * k * (1 - s / 100)}  # noqa: E731
                         for s in range(0, 101, 10)]  # fmt: skip
    runs = lambda k: [{"seed": 0, "diverged": False, "history": history(k)}]  # noqa: E731
    return {"metric": "accuracy", "target": 0.95, "optimizers": {n: {"runs": runs(k)} for k, n in enumerate(names)}}


def test_end_labels_of_converging_curves_do_not_overlap() -> None:
    fig = curves_figure(_converging(list(OPTIMIZER_NAMES)), "val_accuracy", "validation accuracy")
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text() in OPTIMIZER_NAMES]
    assert sorted(t.get_text() for t in labels) == sorted(OPTIMIZER_NAMES)
    boxes = []
    for label in labels:
        label.get_window_extent()  # places the annotation's text on the page
        boxes.append(Text.get_window_extent(label))  # the words alone, without their leader lines
    overlapping = [
        (labels[i].get_text(), labels[j].get_text())
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
        if boxes[i].overlaps(boxes[j])
    ]
    assert not overlapping, f"end labels overlap: {overlapping}"


def test_a_custom_selection_is_labelled_by_what_ran(results, tmp_path) -> None:
    paths = write_outputs(results, tmp_path)
    plan = json.loads(paths["json"].read_text())["plan"]
    assert plan["suite"] is None  # digits-mlp with sgd, signum, adam is not the quick suite
    assert all(name in plan["label"] for name in ("digits-mlp", "sgd", "signum", "adam"))
    text = paths["report"].read_text()
    assert "quick" not in text.lower()
    assert "A custom selection: 1 task (digits-mlp), 3 optimizers (sgd, signum, adam)" in text
    assert "quick" not in markdown_tables(results).split("\n")[0].lower()


def _caption(text: str, task: str) -> str:
    return re.search(rf'<h2 id="{task}">.*?</p>', text, flags=re.DOTALL).group(0)


def test_task_caption_names_gd_only_where_gd_ran(results) -> None:
    assert "gd" not in re.findall(r"\w+", _caption(render_report(results), "digits-mlp"))
    with_gd = copy.deepcopy(results)
    with_gd["tasks"]["digits-mlp"]["optimizers"]["gd"] = with_gd["tasks"]["digits-mlp"]["optimizers"]["sgd"]
    with_gd["plan"]["optimizers"].append("gd")
    assert "batch 32; gd full batch" in _caption(render_report(summarise(with_gd)), "digits-mlp")


def test_one_task_says_why_there_is_no_performance_profile(results) -> None:
    text = render_report(results)
    assert "Not drawn: this run has 1 task" in text
    assert 'alt="performance profiles' not in text
    assert text.count("data:image/png") == 2  # the task's curves and its tuning sweep only


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
