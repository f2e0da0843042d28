"""The comparison's tables as Markdown, for documentation generated from a real run (never typed in)."""

from __future__ import annotations

from typing import Any

from descend.report._html import summary_table, task_table

__all__ = ["markdown_tables"]


def _markdown(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no rows)\n"
    head = list(rows[0])
    align = [":--" if k in ("rank", "optimizer", "grid") else "--:" for k in head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r[k].replace("|", "\\|") for k in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_tables(results: dict[str, Any], tasks: list[str] | None = None) -> str:
    """The run's conditions, its summary table and the tables of ``tasks`` (default: every task)."""
    plan, env = results["plan"], results["environment"]
    parts = [
        f"*{plan['suite']} suite, {env['date']}: {len(results['tasks'])} tasks, optimizers "
        f"{', '.join(plan['optimizers'])}; learning rate tuned on {plan['tune_seeds']} seed(s), then seeds "
        f"0-{plan['seeds'] - 1} at the chosen rate; {results['seconds']:.0f} s wall on {env['cpus']} CPU(s), "
        f"{env['workers']} worker process(es) x {env['threads_per_run']} thread(s), {env['device']}, "
        f"torch {env['torch']}.*\n",
        "**Summary** (rank per task, '=' tied within 95% intervals):\n",
        _markdown(summary_table(results)),
    ]
    for name in tasks or list(results["tasks"]):
        task = results["tasks"][name]
        parts.append(f"**{name}**: {task['description']}.\n")
        parts.append(_markdown(task_table(task)))
    return "\n".join(parts)
