"""The comparison's figures (matplotlib, Agg backend), returned as PNG bytes.

Every optimizer has its own colour from the Okabe-Ito palette (readable with the common colour-vision
deficiencies) and its own dash pattern, fixed across every figure and the report's table swatches
(:func:`style_of` is the one source for both), so a curve is identifiable by colour or by dash alone.
Curves carry direct labels beside their right end, spread apart so none overlap; the tuning sweep's and
the profile's legends sit outside the axes.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

__all__ = ["COLOURS", "DASHES", "LINE_WIDTH", "curves_figure", "curves_png", "profile_png", "style_of", "sweep_png"]

#: Okabe-Ito colours by optimizer name (yellow darkened for contrast on white). The two blues go to
#: optimizers that also differ in dash, and the quick suite (sgd, momentum, signum, adam) uses only one.
COLOURS: dict[str, str] = {
    "gd": "#999999",
    "sgd": "#000000",
    "momentum": "#D55E00",
    "signsgd": "#56B4E9",
    "signum": "#009E73",
    "softsign": "#B59F00",
    "lion": "#E69F00",
    "adam": "#0072B2",
    "adamw": "#CC79A7",
}

#: Dash pattern by optimizer name: on/off lengths in multiples of the line width (``()``: solid),
#: as matplotlib scales them; the report's swatches draw the same pattern in SVG.
DASHES: dict[str, tuple[float, ...]] = {
    "gd": (2.0, 2.0),
    "sgd": (),
    "momentum": (5.0, 2.0),
    "signsgd": (1.0, 1.5),
    "signum": (5.0, 1.5, 1.0, 1.5),
    "softsign": (5.0, 1.5, 1.0, 1.5, 1.0, 1.5),
    "lion": (9.0, 2.5),
    "adam": (9.0, 2.0, 3.0, 2.0),
    "adamw": (9.0, 2.0, 1.0, 2.0, 1.0, 2.0),
}

#: Width of the curves (points); dash lengths scale with it.
LINE_WIDTH = 1.6

_OTHER = ("#444444", ())  # a name without a registered style


def style_of(name: str) -> dict[str, Any]:
    """Colour and line style of an optimizer's curves, as matplotlib keyword arguments.

    ``linestyle`` is ``"-"`` or ``(0, DASHES[name])``; :data:`COLOURS` and :data:`DASHES` are the
    source of both the figures and the report's swatches.
    """
    colour = COLOURS.get(name, _OTHER[0])
    dashes = DASHES.get(name, _OTHER[1])
    return {"color": colour, "linestyle": (0, dashes) if dashes else "-"}


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _spread(ys: list[float], gap: float, low: float = -math.inf, high: float = math.inf) -> list[float]:
    """Label positions at least ``gap`` apart, in the order of ``ys``, each as near its own value as the
    others allow, the stack kept within ``[low, high]`` where it fits there."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [0.0] * len(ys)
    last = -math.inf
    for i in order:  # upwards: each at least a gap above the one below
        placed[i] = max(ys[i], last + gap)
        last = placed[i]
    ceiling = high
    for i in reversed(order):  # downwards: nothing above the top, the gaps kept
        placed[i] = min(placed[i], ceiling)
        ceiling = placed[i] - gap
    floor = low
    for i in order:  # and nothing below the bottom where there is room
        placed[i] = max(placed[i], floor)
        floor = placed[i] + gap
    return placed


LABEL_SIZE = 8  # points


def _direct_labels(ax: Any, ends: list[tuple[str, float, float]]) -> None:
    """Write each name right of the axes, level with its curve's last point, moved apart (in points on
    the page, so on any scale) until no two labels overlap; a thin line joins a moved label to its curve."""
    if not ends:
        return
    ax.set_ylim(*ax.get_ylim())  # freeze the limits: positions are computed on the final axes
    to_points = 72.0 / ax.get_figure().dpi
    low, high = sorted(ax.get_ylim())
    anchors = [(x, min(max(y, low), high)) for _, x, y in ends]
    y_points = [ax.transData.transform(xy)[1] * to_points for xy in anchors]
    bottom, top = (v * to_points for v in (ax.bbox.y0, ax.bbox.y1))
    placed = _spread(y_points, gap=LABEL_SIZE * 1.3, low=bottom, high=top)
    for (name, _, _), xy, want in zip(ends, anchors, placed):
        colour = style_of(name)["color"]
        ax.annotate(
            name,
            xy=xy,
            xytext=(1.03, (want - bottom) / (top - bottom)),
            textcoords="axes fraction",
            va="center",
            fontsize=LABEL_SIZE,
            color=colour,
            annotation_clip=False,
            arrowprops={"arrowstyle": "-", "color": colour, "linewidth": 0.6, "shrinkA": 1, "shrinkB": 2},
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


def curves_figure(task: dict[str, Any], key: str, ylabel: str, log_y: bool = False) -> Any:
    """``key`` against the step per optimizer: mean over seeds, band from the lowest to the highest seed.

    A dotted horizontal line marks the task's target when ``key`` is its validation metric. Returns the
    matplotlib ``Figure``; :func:`curves_png` renders it.
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
        ax.plot(steps, mean, linewidth=LINE_WIDTH, label=name, **style_of(name))
        if len(values) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=style_of(name)["color"], alpha=0.15, lw=0)
        ends.append((name, float(steps[-1]), float(mean[-1])))
    if key == f"val_{task['metric']}":
        ax.axhline(task["target"], color="#555555", linestyle=":", linewidth=1)
        ax.annotate("target", xy=(0, task["target"]), xycoords=("axes fraction", "data"), xytext=(3, 3),
                    textcoords="offset points", fontsize=7, color="#555555")  # fmt: skip
    _scale(ax, drawn, log_y)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    _direct_labels(ax, ends)
    return fig


def curves_png(task: dict[str, Any], key: str, ylabel: str, log_y: bool = False) -> bytes:
    """:func:`curves_figure` as PNG bytes."""
    return _png(curves_figure(task, key, ylabel, log_y))


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
    for name, entry in task["optimizers"].items():
        tuning = entry["tuning"]
        lrs = tuning["grid"]
        losses = [v if v is not None and math.isfinite(v) else math.nan for v in tuning["mean_val_loss"]]
        style = style_of(name)
        ax.plot(lrs, losses, marker="o", markersize=3, linewidth=LINE_WIDTH, label=name, **style)
        chosen = lrs.index(entry["lr"])
        ax.plot([entry["lr"]], [losses[chosen]], marker="o", markersize=9, color=style["color"], mfc="none", mew=1.8)
        bad = [lr for lr, v in zip(lrs, losses) if math.isnan(v)]
        if bad:
            ax.plot(bad, [1.0] * len(bad), "x", color=style["color"], markersize=7, transform=edge, clip_on=False)
        off = [lr for lr, v in zip(lrs, losses) if not math.isnan(v) and v > top]
        if off:
            ax.plot(off, [1.0] * len(off), "^", color=style["color"], markersize=6, transform=edge, clip_on=False)
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=LABEL_SIZE, frameon=False, handlelength=4.5)
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
            rho = np.array(profile[key][name]) + offset
            ax.step(taus, rho, where="post", linewidth=LINE_WIDTH, label=name, **style_of(name))
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
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, handlelength=4.5)
    return _png(fig)
