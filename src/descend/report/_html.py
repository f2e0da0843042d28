"""One self-contained HTML file for a comparison: plots embedded as base64 PNG, no external assets."""

from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path
from typing import Any

from descend.report._plots import curves_png, sweep_png

__all__ = ["comparison_table", "render_report", "write_report"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.3em .7em;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:.6em;font-size:.8em;overflow-x:auto}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def comparison_table(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per optimizer, best first: the columns the terminal table and the HTML table share."""
    metric, goal = results["metric"], results["goal"]
    seeds = results["spec"]["seeds"]
    rows = []
    for rank, name in enumerate(results["ranking"], start=1):
        e = results["optimizers"][name]
        rows.append(
            {
                "rank": str(rank),
                "optimizer": name,
                "lr": f"{e['lr']:.3g}",
                f"test {metric}": f"{e['test_mean']:.4f} ± {e['test_std']:.4f}",
                f"steps to {goal}" if goal is not None else "steps to goal": _fmt(e["steps_to_goal"]),
                "seconds to goal": _fmt(e["seconds_to_goal"], 3),
                "reached": f"{e['reached_goal']}/{seeds}",
                "seconds": _fmt(e["seconds"], 3),
            }
        )
    return rows


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_report(results: dict[str, Any]) -> str:
    """The report as an HTML string."""
    spec, metric = results["spec"], results["metric"]
    rows = comparison_table(results)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0]) if rows else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    plots = [_img(curves_png(results, "loss", "training loss (minibatch)", log_y=True), "training loss")]
    plots.append(_img(curves_png(results, "val_loss", "validation loss", log_y=True), "validation loss"))
    if metric == "accuracy":
        plots.append(_img(curves_png(results, "val_accuracy", "validation accuracy"), "validation accuracy"))
    plots.append(_img(sweep_png(results), "learning-rate sweep"))
    equations = "".join(
        f"<h3>{html.escape(name)}</h3><pre>{html.escape(e['equations'])}</pre>"
        for name, e in results["optimizers"].items()
    )
    data, model = html.escape(str(results["data"])), html.escape(spec["model"])
    setup = (
        f"data <b>{data}</b> ({results['task']}), model <b>{model}</b> (depth {spec['depth']}, "
        f"width {spec['width']}, {html.escape(spec['activation'])}), {spec['steps']} steps of batch "
        f"{spec['batch_size']} (gd: full batch), {spec['seeds']} seeds at the LR chosen by a "
        f"{spec['sweep_steps']}-step sweep over ×{html.escape(spec['sweep'])} of each default; "
        f"total {results['seconds']:.1f} s."
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>descend compare: {html.escape(str(results["data"]))}</title>
<style>{_STYLE}</style></head><body>
<h1>Optimizer comparison</h1>
<p>{setup}</p>
<h2>Results (test {metric}, mean ± std over seeds)</h2>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Curves (mean over seeds, band = min..max)</h2>
<div class="grid">{"".join(plots)}</div>
<h2>Update equations</h2>
{equations}
</body></html>
"""


def write_report(results: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`render_report` to ``path`` atomically; return the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(render_report(results))
    os.replace(tmp, path)
    return path
