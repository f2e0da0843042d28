"""The comparison's figures (matplotlib, Agg backend), returned as PNG bytes.

Colours are the Okabe-Ito palette, readable with the common colour-vision deficiencies, with a fixed
colour per optimizer across every figure; line styles separate the families (solid: gradient
methods, dashed: sign methods, dash-dot: Adam), so a curve is identifiable without colour too.
Curves carry direct labels at their right end; the profile's legend sits outside the axes.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

__all__ = ["COLOURS", "curves_png", "profile_png", "style_of", "sweep_png"]

#: Okabe-Ito colours by optimizer name (yellow darkened for contrast on white).
COLOURS: dict[str, str] = {
    "gd": "#999999",
    "sgd": "#000000",
    "momentum": "#56B4E9",
    "signsgd": "#B59F00",
    "signum": "#E69F00",
    "softsign": "#CC79A7",
    "lion": "#D55E00",
    "adam": "#0072B2",
    "adamw": "#009E73",
}
_STYLES = {"signsgd": "--", "signum": "--", "softsign": "--", "lion": "--", "adam": "-.", "adamw": "-."}


def style_of(name: str) -> dict[str, Any]:
    """Colour and line style of an optimizer's curves."""
    return {"color": COLOURS.get(name, "#444444"), "linestyle": _STYLES.get(name, "-")}


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _spread(ys: list[float], gap: float, top: float = math.inf) -> list[float]:
    """Move label positions apart to at least ``gap`` (in the axis's units), keeping their order, and
    shift the whole stack down where it would rise above ``top``."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [0.0] * len(ys)
    last = -math.inf
    for i in order:
        placed[i] = max(ys[i], last + gap)
        last = placed[i]
    overflow = last - top
    if overflow > 0:  # the stack ran off the top: move it down as a block (the gaps stay)
        placed = [p - overflow for p in placed]
    return placed


def _direct_labels(ax: Any, ends: list[tuple[str, float, float]], log_y: bool) -> None:
    """Write each name just right of its curve's last point, nudged apart so labels do not overlap."""
    if not ends:
        return
    low, high = ax.get_ylim()
    to = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    back = (lambda v: 10**v) if log_y else (lambda v: v)
    span = to(high) - to(low)
    ys = _spread([to(min(max(y, low), high)) for _, _, y in ends], gap=span * 0.055, top=to(high))
    x_end = max(x for _, x, _ in ends)
    for (name, _, _), y in zip(ends, ys):
        ax.annotate(
            name,
            xy=(x_end, back(y)),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color=style_of(name)["color"],
            annotation_clip=False,
        )


def _scale(ax: Any, values: list[float], log_y: bool) -> bool:
    """Log scale only where it helps (values spanning more than a factor 10); plain tick labels either way."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    finite = [v for v in values if math.isfinite(v) and v > 0]
    use_log = log_y and bool(finite) and max(finite) / min(finite) > 10
    if use_log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    return use_log


def _series(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps and a ``[seeds, steps]`` array of ``key`` over the seeds that did not diverge."""
    per_seed = [
        {int(r["step"]): float(r[key]) for r in run["history"] if isinstance(r.get(key), (int, float))}
        for run in runs
        if not run.get("diverged")
    ]
    per_seed = [s for s in per_seed if s]
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    if not steps:
        return None
    return np.array(steps), np.array([[s[t] for t in steps] for s in per_seed])


def curves_png(task: dict[str, Any], key: str, ylabel: str, log_y: bool = False) -> bytes:
    """``key`` against the step per optimizer: mean over seeds, band from the lowest to the highest seed.

    A dotted horizontal line marks the task's target when ``key`` is its validation metric.
    """
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    ends = []
    drawn: list[float] = []
    for name, entry in task["optimizers"].items():
        series = _series(entry["runs"], key)
        if series is None:
            continue
        steps, values = series
        drawn += values.ravel().tolist()
        mean = values.mean(0)
        ax.plot(steps, mean, linewidth=1.5, **style_of(name))
        if len(values) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=style_of(name)["color"], alpha=0.15, lw=0)
        ends.append((name, float(steps[-1]), float(mean[-1])))
    if key == f"val_{task['metric']}":
        ax.axhline(task["target"], color="#555555", linestyle=":", linewidth=1)
        ax.annotate("target", xy=(0, task["target"]), xycoords=("axes fraction", "data"), xytext=(3, 3),
                    textcoords="offset points", fontsize=7, color="#555555")  # fmt: skip
    used_log = _scale(ax, drawn, log_y)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    _direct_labels(ax, ends, used_log)
    return _png(fig)


def sweep_png(task: dict[str, Any]) -> bytes:
    """Tuning: mean final validation loss over the tuning seeds against the learning rate (log-log).

    A circled marker is the chosen rate; a cross on the top edge is a rate where a seed diverged, a
    triangle there a loss beyond the plotted range (more than 10 times the worst chosen rate's loss).
    """
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    finite = [
        v
        for e in task["optimizers"].values()
        for v in e["tuning"]["mean_val_loss"]
        if v is not None and math.isfinite(v)
    ]
    chosen_losses = [
        e["tuning"]["mean_val_loss"][e["tuning"]["grid"].index(e["lr"])] for e in task["optimizers"].values()
    ]
    worst_chosen = max((v for v in chosen_losses if v is not None and math.isfinite(v)), default=1.0)
    top = min(max(finite, default=1.0), 10 * worst_chosen)  # the highest loss drawn on the scale
    edge = ax.get_xaxis_transform()  # x in data, y in axes fractions: markers on the top edge
    ends = []
    for name, entry in task["optimizers"].items():
        tuning = entry["tuning"]
        lrs = tuning["grid"]
        losses = [v if v is not None and math.isfinite(v) else math.nan for v in tuning["mean_val_loss"]]
        style = style_of(name)
        ax.plot(lrs, losses, marker="o", markersize=3, linewidth=1.2, **style)
        chosen = lrs.index(entry["lr"])
        ax.plot([entry["lr"]], [losses[chosen]], marker="o", markersize=9, color=style["color"], mfc="none", mew=1.8)
        bad = [lr for lr, v in zip(lrs, losses) if math.isnan(v)]
        if bad:
            ax.plot(bad, [1.0] * len(bad), "x", color=style["color"], markersize=7, transform=edge, clip_on=False)
        off = [lr for lr, v in zip(lrs, losses) if not math.isnan(v) and v > top]
        if off:
            ax.plot(off, [1.0] * len(off), "^", color=style["color"], markersize=6, transform=edge, clip_on=False)
        last = max((i for i, v in enumerate(losses) if not math.isnan(v)), default=None)
        if last is not None:
            ends.append((name, lrs[last], losses[last]))
    ax.set_xscale("log")
    shown = [v for v in finite if v <= top]
    low = min(shown, default=top)
    if _scale(ax, shown, log_y=True):
        ax.set_ylim(low / 1.3, top * 1.3)
    else:
        ax.set_ylim(low - 0.06 * (top - low), top + 0.06 * (top - low) + 1e-12)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (mean over tuning seeds)")
    ax.grid(True, which="major", alpha=0.3)
    for name, x, y in ends:
        if y > top:
            continue
        ax.annotate(
            name, xy=(x, y), xytext=(4, 2), textcoords="offset points", fontsize=7, color=style_of(name)["color"]
        )
    return _png(fig)


def profile_png(results: dict[str, Any]) -> bytes:
    """The performance profiles ``ρ_o(τ)``, by time to target (left) and by steps to target (right)."""
    profile = results["profile"]
    taus = np.array(profile["taus"])
    fig = _figure(10.5, 3.6)
    axes = fig.subplots(1, 2, sharey=True)
    n_tasks = len(results["tasks"])
    for ax, key, what in (
        (axes[0], "seconds_to_target", "time"),
        (axes[1], "steps_to_target", "steps"),
    ):
        names = list(profile[key])
        for i, name in enumerate(names):
            # a small vertical offset per optimizer keeps coinciding profiles visible (values are k / tasks)
            offset = 0.012 * (i - (len(names) - 1) / 2)
            ax.step(
                taus, np.array(profile[key][name]) + offset, where="post", linewidth=1.6, label=name, **style_of(name)
            )
        ax.set_xscale("log")
        ax.set_xlim(taus[0], taus[-1])
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel(f"τ: {what} to target ÷ the best optimizer's {what} on that task")
        ax.set_title(f"by {what} to target", fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        ticks = [t for t in (1, 1.5, 2, 3, 5, 10) if taus[0] <= t <= taus[-1]]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    axes[0].set_ylabel(f"fraction of the {n_tasks} tasks within τ")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return _png(fig)
