"""The comparison's tables as Markdown, for documentation generated from a real run (never typed in)."""

from __future__ import annotations

from typing import Any

from descend.report._html import summary_table, task_table

__all__ = ["known_results", "markdown_tables"]


def _markdown(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no rows)\n"
    head = list(rows[0])
    align = [":--" if k in ("rank", "optimizer", "grid") else "--:" for k in head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r[k].replace("|", "\\|") for k in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _versus(results: dict[str, Any], task: str, better: str, worse: str) -> str | None:
    info = results["tasks"].get(task)
    if info is None or better not in info["optimizers"] or worse not in info["optimizers"]:
        return None
    a, b = info["optimizers"][better]["summary"], info["optimizers"][worse]["summary"]
    if a["test"] is None or b["test"] is None:
        return f"{task}: {better} vs {worse}: a unit diverged on every seed, no comparison"
    ta, tb = a["test"], b["test"]
    sign = 1 if info["higher_is_better"] else -1
    ahead = sign * (ta["mean"] - tb["mean"])
    separated = ta["low"] > tb["high"] if info["higher_is_better"] else ta["high"] < tb["low"]
    verdict = "holds: the 95% intervals do not overlap" if separated else (
        "ahead on the mean, but the 95% intervals overlap" if ahead > 0 else "does NOT hold"
    )  # fmt: skip
    return (
        f"{task}: {better} {ta['mean']:.3f} ± {ta['half_width']:.3f} vs {worse} {tb['mean']:.3f} ± "
        f"{tb['half_width']:.3f} (test {info['metric']}, {ta['n']} and {tb['n']} seeds): {verdict}"
    )


def known_results(results: dict[str, Any]) -> list[str]:
    """The published expectations this run can check, each stated with its numbers and seed counts:
    Adam beats SGD on ``text-lm``; sign methods and Adam beat gradient descent on ``badly-scaled``;
    the optimizers tie on ``digits-mlp``."""
    lines = [_versus(results, "text-lm", name, "sgd") for name in ("adam", "adamw", "lion", "signum")] + [
        _versus(results, "badly-scaled", name, "sgd") for name in ("signsgd", "signum", "lion", "adam", "adamw")
    ]
    digits = results["tasks"].get("digits-mlp")
    if digits is not None:
        top = digits["ranking"][0]["members"]
        n = len(digits["optimizers"])
        lines.append(
            f"digits-mlp: {len(top)} of {n} optimizers share rank 1 ({', '.join(top)}): their 95% intervals of the "
            "test accuracy overlap the best one's"
        )
    return [line for line in lines if line]


def markdown_tables(results: dict[str, Any], tasks: list[str] | None = None) -> str:
    """The run's conditions, its summary table and the tables of ``tasks`` (default: every task)."""
    plan, env = results["plan"], results["environment"]
    parts = [
        f"*{plan.get('label') or plan['suite'] + ' suite'}, {env['date']}: {len(results['tasks'])} tasks, optimizers "
        f"{', '.join(plan['optimizers'])}; learning rate tuned on {plan['tune_seeds']} seed(s), then seeds "
        f"0-{plan['seeds'] - 1} at the chosen rate; {results['seconds']:.0f} s wall on {env['cpus']} CPU(s), "
        f"{env['workers']} worker process(es) x {env['threads_per_run']} thread(s), {env['device']}, "
        f"torch {env['torch']}; the runs took {env.get('cpu_seconds_of_runs', float('nan')):.0f} CPU seconds"
        + (
            f"; 1-minute load average {env['load_average'][0]} at the start, {env['load_average'][1]} at the end "
            "(other work on the machine included)"
            if env.get("load_average") and None not in env["load_average"]
            else ""
        )
        + ".*\n",
        "**Summary** (rank per task, '=' tied within 95% intervals):\n",
        _markdown(summary_table(results)),
    ]
    for name in tasks or list(results["tasks"]):
        task = results["tasks"][name]
        parts.append(f"**{name}**: {task['description']}.\n")
        parts.append(_markdown(task_table(task)))
    checks = known_results(results)
    if checks:
        scaled = "badly-scaled" in results["tasks"]
        note = " (on the badly-scaled task sgd is full-batch gradient descent)" if scaled else ""
        parts.append(f"**Known results checked on this run**{note}:\n")
        parts.append("\n".join(f"- {line}" for line in checks) + "\n")
    return "\n".join(parts)
