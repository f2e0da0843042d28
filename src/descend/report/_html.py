"""The comparison's tables, its self-contained HTML report and its result files.

- :func:`task_table` / :func:`summary_table`: rows of strings shared by the terminal and the report;
- :func:`render_report` / :func:`write_report`: one HTML file, every figure embedded as base64 PNG;
- :func:`write_outputs`: ``report.html``, ``results.csv`` (one row per task and optimizer) and
  ``results.json`` (everything, per-seed curves included), each written atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any

from descend._io import atomic_write, write_json
from descend.report._plots import DASHES, curves_png, profile_png, style_of, sweep_png

__all__ = [
    "COLUMNS",
    "comparison_table",
    "render_report",
    "summary_table",
    "swatch",
    "task_table",
    "write_outputs",
    "write_report",
]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}td,th{padding:.3em .6em;border-bottom:1px solid #e4e4e4;
text-align:right;vertical-align:top}th{background:#f4f4f4}
.left1 th:first-child,.left1 td:first-child,.left2 th:nth-child(-n+2),.left2 td:nth-child(-n+2){text-align:left}
img{max-width:100%}.grid{display:grid;grid-template-columns:1fr 1fr;gap:.8em}
pre{background:#f6f6f6;padding:.6em;font-size:.8em;overflow-x:auto}
.note{font-size:.85em;color:#444}.swatch{vertical-align:middle;margin-right:.3em}
dl.cols{font-size:.85em;color:#333;display:grid;grid-template-columns:max-content 1fr;gap:.15em .8em}
dl.cols dt{font-weight:600}dl.cols dd{margin:0}
"""


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def _interval(stats: dict[str, float] | None, metric: str) -> str:
    if stats is None:
        return "all diverged"
    digits = 4 if metric == "accuracy" else 3
    return f"{stats['mean']:.{digits}f} ± {stats['half_width']:.{digits}f}"


def _rank_labels(task: dict[str, Any]) -> dict[str, str]:
    labels = {}
    for group in task["ranking"]:
        tied = len(group["members"]) > 1
        for name in group["members"]:
            labels[name] = f"{group['rank']}=" if tied else str(group["rank"])
    return labels


def _order(task: dict[str, Any]) -> list[str]:
    return [n for g in task["ranking"] for n in g["members"]]


def task_table(task: dict[str, Any]) -> list[dict[str, str]]:
    """One row per optimizer of a task in rank order (see :data:`COLUMNS` for the meaning of each column)."""
    metric = task["metric"]
    rows = []
    ranks = _rank_labels(task)
    for name in _order(task):
        e = task["optimizers"][name]
        s, t = e["summary"], e["tuning"]
        grid = "at edge" if t["at_edge"] else (f"+{t['extended']}" if t["extended"] else "interior")
        rows.append(
            {
                "rank": ranks[name],
                "optimizer": name,
                "lr": f"{e['lr']:.3g}",
                "grid": grid,
                f"test {metric} (95% CI)": _interval(s["test"], metric),
                "reached": f"{s['reached']}/{s['seeds']}",
                "steps to target": _num(s["steps_to_target"]),
                "s to target": _num(s["seconds_to_target"], 3),
                "diverged": str(s["diverged"]),
                "tuning": f"{t['runs']} runs, {t['seconds']:.1f} s",
            }
        )
    return rows


#: What each column of the tables means (the report prints it under the tables).
COLUMNS: dict[str, str] = {
    "rank": "by mean final test metric; optimizers whose 95% intervals overlap the group leader's share its rank, "
    "marked '=' (the seeds cannot tell them apart)",
    "lr": "learning rate chosen by tuning (lowest mean final validation loss over the tuning seeds)",
    "grid": "'interior': the best rate had tried rates on both sides; '+k': the grid was extended k times past an "
    "edge to get there; 'at edge': still the smallest or largest rate tried (the optimum may lie beyond)",
    "test metric (95% CI)": "final test metric at the chosen rate: mean ± half-width of the 95% Student-t interval "
    "over the seeds that did not diverge",
    "reached": "seeds whose final validation metric meets the target / seeds run",
    "steps to target": "median (the lower one for an even count) over the seeds that reached the target of the "
    "first evaluated step from which the validation metric stays at the target until the end",
    "s to target": "the same in seconds of training (evaluations included), wall clock on this machine",
    "diverged": "seeds whose loss became NaN or infinite, or whose validation loss ended above where it started",
    "tuning": "runs and seconds spent choosing the learning rate (the tuning budget)",
}


def summary_table(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per optimizer across tasks: its rank on each task, tasks reached, divergences, cost."""
    rows = []
    for row in results["summary"]:
        cells = {"optimizer": row["optimizer"]}
        cells.update({task: row["ranks"][task] for task in results["tasks"]})
        cells["tasks reached"] = f"{row['reached']}/{row['tasks']}"
        cells["diverged seeds"] = str(row["diverged"])
        cells["runs"] = str(row["runs"])
        cells["seconds"] = f"{row['seconds']:.0f}"
        cells["CPU s"] = f"{row.get('cpu_seconds', math.nan):.0f}"
        rows.append(cells)
    return rows


def comparison_table(results: dict[str, Any], task: str | None = None) -> list[dict[str, str]]:
    """:func:`task_table` of ``task`` (default: the first task)."""
    return task_table(results["tasks"][task or next(iter(results["tasks"]))])


def swatch(name: str, width: int = 52) -> str:
    """An inline SVG line in the optimizer's colour and dash pattern, as its curves are drawn
    (:data:`~descend.report._plots.COLOURS`, :data:`~descend.report._plots.DASHES`, scaled by the line
    width as matplotlib scales them)."""
    colour = style_of(name)["color"]
    dashes = DASHES.get(name, ())
    stroke = 2.0  # pixels, about the curves' width on the page; the pattern is in units of the width
    dash = f' stroke-dasharray="{",".join(f"{d * stroke:g}" for d in dashes)}"' if dashes else ""
    return (
        f'<svg class="swatch" width="{width}" height="10" role="img" aria-label="{html.escape(name)} line">'
        f'<line x1="0" y1="5" x2="{width}" y2="5" stroke="{colour}" stroke-width="{stroke:g}"{dash}/></svg>'
    )


def _table(rows: list[dict[str, str]], swatch_column: bool = False, left: int = 2) -> str:
    if not rows:
        return "<p>(no rows)</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = []
    for r in rows:
        cells = []
        for k, v in r.items():
            text = html.escape(v)
            if swatch_column and k == "optimizer":
                text = swatch(v) + text
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='left{left}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _columns() -> str:
    return "<dl class='cols'>" + "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in COLUMNS.items()
    ) + "</dl>"  # fmt: skip


def _batch_caption(task: dict[str, Any]) -> str:
    """The batch the task's runs used: gd is named only where it ran (it always takes the full batch)."""
    if task["batch_size"] is None:
        return "full batch"
    return f"batch {task['batch_size']}" + ("; gd full batch" if "gd" in task["optimizers"] else "")


def _task_section(name: str, task: dict[str, Any]) -> str:
    metric = task["metric"]
    unit = f" {task['unit']}" if task["unit"] else ""
    relation = "≥" if task["higher_is_better"] else "≤"
    label = f"validation {metric}" + (f" ({task['unit']})" if task["unit"] and metric == "loss" else "")
    plots = [
        _img(curves_png(task, f"val_{metric}", label, log_y=metric == "loss"), f"{name}: validation {metric}"),
        _img(sweep_png(task), f"{name}: learning-rate tuning"),
    ]
    return f"""
<h2 id="{html.escape(name)}">{html.escape(name)}</h2>
<p>{html.escape(task["summary"])}. Budget {task["steps"]} steps
({_batch_caption(task)});
target: validation {metric} {relation} {task["target"]:g}{html.escape(unit)}.</p>
{_table(task_table(task), swatch_column=True)}
<div class="grid">{"".join(plots)}</div>
<p class="note">Left: validation {metric} against the step, the line the mean over seeds and the band the
lowest to the highest seed; dotted: the target. Right: the tuning sweep, the mean final validation loss
over the tuning seeds at each learning rate tried; the circled point is the chosen rate, a cross on the
top edge a rate where a seed diverged, a triangle there a loss beyond the plotted range (over 10 times the
worst chosen rate's).</p>
"""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _label(plan: dict[str, Any]) -> str:
    """What ran: ``"quick suite"``, or a custom selection's tasks and optimizers."""
    return plan.get("label") or f"{plan['suite']} suite"  # results written before the label was recorded


#: The performance profile needs several tasks: with one, ρ(τ) is a step from 0 to 1 at each optimizer's
#: ratio to the fastest, which the task's own table says better.
PROFILE_MIN_TASKS = 2


def _profile_section(results: dict[str, Any]) -> str:
    n = len(results["tasks"])
    if n < PROFILE_MIN_TASKS:
        return (
            f"<p class='note'>Not drawn: this run has {_count(n, 'task')}, and a performance profile compares "
            f"optimizers across tasks (with one task each curve is a single step from 0 to 1). The task's table "
            f"below gives each optimizer's steps and seconds to target. Run at least {PROFILE_MIN_TASKS} tasks "
            f"(--task NAME,NAME or a suite) for a profile.</p>"
        )
    return f"""{_img(profile_png(results), "performance profiles by time and by steps to target")}
<p class="note">For each optimizer, the fraction of tasks on which it reaches the target within a factor τ of
the fastest optimizer on that task (AlgoPerf / Dolan-Moré). Its time on a task is the median over seeds of the
time (left) or steps (right) to target, counted only if at least half of the seeds reach the target. Higher
and further left is better; ρ(1) is the share of tasks it is fastest on, the right end the share it solves.
The values are multiples of 1/(number of tasks); the lines are drawn a hair apart so that equal profiles stay
visible.</p>
"""


def render_report(results: dict[str, Any]) -> str:
    """The report as an HTML string: profile and summary at the top, then one section per task."""
    plan, env = results["plan"], results["environment"]
    tasks = results["tasks"]
    setup = (
        ("The <b>" + html.escape(plan["suite"]) + " suite</b>: " if plan.get("suite") else "A custom selection: ")
        + f"{_count(len(tasks), 'task')} ({html.escape(', '.join(tasks))}), "
        f"{_count(len(plan['optimizers']), 'optimizer')} ({html.escape(', '.join(plan['optimizers']))}); "
        f"per task and optimizer a learning-rate grid (multipliers "
        f"{', '.join(f'{m:.3g}' for m in plan['grid'])} of the task's centre, extended up to "
        f"{plan['max_extensions']} times past an edge) tuned on {plan['tune_seeds']} seed(s), then "
        f"{plan['seeds']} seeds at the chosen rate. Total {results['seconds']:.0f} s on {env['workers']} worker(s) "
        f"× {env['threads_per_run']} thread(s), {html.escape(env['device'])}, torch {html.escape(env['torch'])}, "
        f"{html.escape(env['date'])}."
    )
    sections = "".join(_task_section(name, task) for name, task in tasks.items())
    first = next(iter(tasks))
    equations = "".join(
        f"<h3>{html.escape(name)}</h3><pre>{html.escape(entry['equations'])}</pre>"
        for name, entry in next(iter(tasks.values()))["optimizers"].items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>descend compare: {html.escape(_label(plan))}</title>
<style>{_STYLE}</style></head><body>
<h1>Optimizer comparison</h1>
<p>{setup}</p>
<h2>Performance profile</h2>
{_profile_section(results)}
<h2>Summary</h2>
{_table(summary_table(results), swatch_column=True, left=1)}
<p class="note">Task columns: the optimizer's rank on that task ('=' shared with others whose 95% intervals
overlap). Tasks reached: tasks where at least half of its seeds end at the target. Runs, seconds and CPU s:
everything it cost, tuning included (wall-clock seconds of its units, and the CPU time of its runs, which
depends less on what else the machine was doing).</p>
<h3>Columns of the task tables</h3>
{_columns()}
{sections}
<h2>Update equations</h2>
<p class="note">Each optimizer's update as descend runs it, with the hyperparameters chosen on {html.escape(first)}
(only the learning rate changes between tasks).</p>
{equations}
</body></html>
"""


def write_report(results: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`render_report` to ``path`` atomically; return the path."""
    return atomic_write(path, render_report(results))


_CSV_HEADER = [
    "task", "optimizer", "metric", "target", "lr", "grid_extended", "at_edge", "tuning_runs", "tuning_seconds",
    "seeds", "diverged", "test_mean", "test_ci_low", "test_ci_high", "reached", "steps_to_target_median",
    "seconds_to_target_median", "rank", "tied",
]  # fmt: skip


def _csv_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = [_CSV_HEADER]
    for name, task in results["tasks"].items():
        for group in task["ranking"]:
            for o in group["members"]:
                e = task["optimizers"][o]
                s, t = e["summary"], e["tuning"]
                test = s["test"] or {}
                rows.append(
                    [
                        name, o, task["metric"], task["target"], e["lr"], t["extended"], t["at_edge"], t["runs"],
                        round(t["seconds"], 3), s["seeds"], s["diverged"], test.get("mean"), test.get("low"),
                        test.get("high"), s["reached"], s["steps_to_target"], s["seconds_to_target"],
                        group["rank"], len(group["members"]) > 1,
                    ]
                )  # fmt: skip
    return rows


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_outputs(results: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``report.html``, ``results.csv`` and ``results.json`` into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(_csv_rows(results))
    return {
        "report": write_report(results, out / "report.html"),
        "csv": atomic_write(out / "results.csv", buffer.getvalue()),
        "json": write_json(out / "results.json", _finite(results), allow_nan=False),
    }
