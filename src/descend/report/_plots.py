"""The comparison's figures, drawn with matplotlib's Agg backend and returned as PNG bytes."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

__all__ = ["curves_png", "sweep_png"]


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _series(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps and a ``[seeds, steps]`` array of ``key`` (rows where every seed logged it)."""
    per_seed = []
    for run in runs:
        if run.get("diverged"):
            continue
        per_seed.append({int(r["step"]): float(r[key]) for r in run["history"] if isinstance(r.get(key), (int, float))})
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    if not steps:
        return None
    return np.array(steps), np.array([[s[t] for t in steps] for s in per_seed])


def curves_png(results: dict[str, Any], key: str, ylabel: str, log_y: bool = False) -> bytes:
    """``key`` against the step for each optimizer: the mean over seeds, with a band from min to max."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, entry in results["optimizers"].items():
        series = _series(entry["runs"], key)
        if series is None:
            continue
        steps, values = series
        line = ax.plot(steps, values.mean(0), linewidth=1.4, label=f"{name} (lr {entry['lr']:.2g})")[0]
        if len(values) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.18, linewidth=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def sweep_png(results: dict[str, Any]) -> bytes:
    """The learning-rate sweep: final validation metric against the LR (log scale); gaps = diverged."""
    fig = _figure()
    ax = fig.add_subplot()
    metric = results["metric"]
    for name, entry in results["optimizers"].items():
        lrs = [s["lr"] for s in entry["sweep"]]
        scores = [s["score"] if math.isfinite(s["score"]) else math.nan for s in entry["sweep"]]
        if metric == "loss":
            scores = [-v for v in scores]
        line = ax.plot(lrs, scores, marker="o", markersize=3, linewidth=1.2, label=name)[0]
        ax.plot([entry["lr"]], [scores[lrs.index(entry["lr"])]], marker="*", markersize=11, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {metric} after the sweep run")
    ax.set_title("LR sweep (★ = chosen)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)
