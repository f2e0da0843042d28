"""descend.report: plots and the self-contained HTML report of ``descend compare``.

- :func:`write_report` / :func:`render_report`: one HTML file, plots embedded as base64 PNG.
- :func:`comparison_table`: the rows shared by the terminal table and the report.
- :func:`curves_png`, :func:`sweep_png`: the figures (matplotlib, Agg backend) as PNG bytes.
"""

from descend.report._html import comparison_table, render_report, write_report
from descend.report._plots import curves_png, sweep_png

__all__ = ["comparison_table", "curves_png", "render_report", "sweep_png", "write_report"]
