"""descend.report: the tables, figures and self-contained HTML report of ``descend compare``.

- :func:`write_outputs`: ``report.html``, ``results.csv`` and ``results.json`` of a comparison;
- :func:`render_report` / :func:`write_report`: the HTML file, figures embedded as base64 PNG;
- :func:`summary_table`, :func:`task_table`: the rows the terminal and the report share;
  :func:`markdown_tables` the same as Markdown (``python -m descend.report`` writes the docs' assets);
- :func:`profile_png`, :func:`curves_png`, :func:`sweep_png`: the figures (matplotlib, Agg) as PNG bytes,
  each optimizer in its :func:`style_of` (colour from :data:`COLOURS`, dash from :data:`DASHES`), which
  the tables' :func:`swatch` draws too.
"""

from descend.report._html import (
    COLUMNS,
    comparison_table,
    render_report,
    summary_table,
    swatch,
    task_table,
    write_outputs,
    write_report,
)
from descend.report._markdown import known_results, markdown_tables
from descend.report._plots import COLOURS, DASHES, curves_figure, curves_png, profile_png, style_of, sweep_png

__all__ = [
    "COLOURS",
    "COLUMNS",
    "DASHES",
    "comparison_table",
    "curves_figure",
    "curves_png",
    "known_results",
    "markdown_tables",
    "profile_png",
    "render_report",
    "style_of",
    "summary_table",
    "swatch",
    "sweep_png",
    "task_table",
    "write_outputs",
    "write_report",
]
