"""Fair learning-rate tuning and seed statistics, shared by ``descend compare`` and the experiments.

Tuning (DeepOBS / AlgoPerf practice): each method gets the same budget on a log-spaced grid of
learning rates; a run is scored by its final *validation* loss, averaged over seeds, a diverged
seed (non-finite or exploding loss) counting as the worst possible score. While the best mean sits
at an edge of the grid, the grid is extended one more point beyond that edge (up to
``max_extensions`` times), so the chosen rate is an interior optimum or the result says it is not.

Statistics: a mean over ``n`` seeds is reported with its 95% Student-t interval
``mean ± t_{0.975, n-1} · s / √n``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SeedStats", "TuneResult", "log_grid", "seed_stats", "t_quantile", "tie_groups", "tune_lr"]

# t_{0.975, df} for df = 1..30; beyond that the normal quantile is within 1%.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


@dataclass
class SeedStats:
    """Summary of one metric over seeds: ``mean ± half_width`` is the 95% t-interval (0 for one seed)."""

    n: int
    mean: float
    half_width: float
    min: float
    max: float
    median: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def overlaps(self, other: SeedStats) -> bool:
        """Whether the two 95% intervals overlap (the difference is then not called significant)."""
        return self.low <= other.high and other.low <= self.high

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "low": self.low, "high": self.high}


def seed_stats(values: Sequence[float]) -> SeedStats:
    """Mean, 95% t-interval, min, max and median of ``values`` (finite values; at least one)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("seed_stats needs at least one value")
    mean = statistics.fmean(xs)
    half = t_quantile(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return SeedStats(len(xs), mean, half, min(xs), max(xs), statistics.median(xs))


def log_grid(low: float, high: float, per_decade: int = 2) -> list[float]:
    """Log-spaced rates from ``low`` to ``high`` inclusive, ``per_decade`` points per factor of 10."""
    if not (0 < low <= high) or not math.isfinite(high):
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    if per_decade < 1:
        raise ValueError(f"per_decade must be >= 1, got {per_decade}")
    n = round(math.log10(high / low) * per_decade)
    return [float(f"{low * 10 ** (k / per_decade):.3g}") for k in range(n + 1)]


@dataclass
class TuneResult:
    """The outcome of :func:`tune_lr`.

    ``scores[lr]`` holds one final validation loss per seed (``inf`` for a diverged seed);
    ``best_lr`` minimises their mean; ``at_edge`` is true when the best rate is still the smallest or
    largest tried after all extensions (the optimum may lie beyond the grid).
    """

    best_lr: float
    scores: dict[float, list[float]]
    extended: int
    at_edge: bool
    runs: int
    seconds: float
    details: dict[float, list[Any]] = field(default_factory=dict)

    @property
    def grid(self) -> list[float]:
        return sorted(self.scores)

    def mean_score(self, lr: float) -> float:
        return statistics.fmean(self.scores[lr])

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_lr": self.best_lr,
            "grid": self.grid,
            "mean_val_loss": [self.mean_score(lr) for lr in self.grid],
            "extended": self.extended,
            "at_edge": self.at_edge,
            "runs": self.runs,
            "seconds": self.seconds,
        }


def _score(result: Any) -> tuple[float, Any]:
    """A run returns its final validation loss, or ``(loss, anything)``; non-finite means diverged."""
    loss, detail = result if isinstance(result, tuple) else (result, None)
    loss = float(loss)
    return (loss if math.isfinite(loss) else math.inf), detail


def tune_lr(run: Callable[[float, int], Any], grid: Sequence[float], seeds: Sequence[int] = (0,), *,
            max_extensions: int = 3, step_factor: float | None = None) -> TuneResult:
    """Pick the learning rate minimising the mean over ``seeds`` of ``run(lr, seed)``'s validation loss.

    ``run(lr, seed)`` trains one model and returns its final validation loss (or ``(loss, detail)``;
    ``detail`` is kept in ``TuneResult.details``). ``grid`` is sorted and deduplicated; while the best
    rate is its smallest or largest point, one more point is added beyond that edge, a factor
    ``step_factor`` away (default: the grid's own ratio between neighbours, else ``10**0.5``), at most
    ``max_extensions`` times. Ties are broken towards the smaller rate. A seed whose loss is not finite
    scores ``inf``, so a rate that diverges on any seed loses to one that never does.
    """
    rates = sorted({float(r) for r in grid})
    if not rates or rates[0] <= 0:
        raise ValueError(f"grid must hold positive learning rates, got {list(grid)}")
    if not seeds:
        raise ValueError("tune_lr needs at least one seed")
    factor = step_factor or (rates[1] / rates[0] if len(rates) > 1 else 10**0.5)
    if factor <= 1:
        raise ValueError(f"step_factor must be > 1, got {factor}")
    scores: dict[float, list[float]] = {}
    details: dict[float, list[Any]] = {}
    started = time.perf_counter()

    def evaluate(lr: float) -> None:
        pairs = [_score(run(lr, seed)) for seed in seeds]
        scores[lr] = [p[0] for p in pairs]
        details[lr] = [p[1] for p in pairs]

    for lr in rates:
        evaluate(lr)
    extended = 0

    def best() -> float:
        return min(sorted(scores), key=lambda r: statistics.fmean(scores[r]))

    while extended < max_extensions:
        chosen, tried = best(), sorted(scores)
        if math.isinf(statistics.fmean(scores[chosen])):
            break  # every rate diverged: no edge to follow
        if chosen == tried[0]:
            evaluate(float(f"{tried[0] / factor:.3g}"))
        elif chosen == tried[-1]:
            evaluate(float(f"{tried[-1] * factor:.3g}"))
        else:
            break
        extended += 1
    chosen, tried = best(), sorted(scores)
    return TuneResult(
        best_lr=chosen,
        scores=scores,
        extended=extended,
        at_edge=len(tried) > 1 and chosen in (tried[0], tried[-1]),
        runs=len(scores) * len(seeds),
        seconds=time.perf_counter() - started,
        details=details,
    )


def tie_groups(intervals: dict[str, tuple[float, float, float] | None], *,
               higher_is_better: bool) -> list[dict[str, Any]]:
    """Rank ``name -> (mean, low, high)`` by mean, grouping names whose intervals overlap the leader's.

    Sorted best first, the best name not yet grouped leads a group; every later name whose
    ``[low, high]`` overlaps the leader's joins it (the seeds cannot tell them apart). A group's
    ``rank`` is one more than the names ranked before it, so ranks read like "1, 1, 3". ``None`` (every seed
    diverged) ranks last, in a group of its own each. Returns ``[{"rank", "members"}]``.
    """
    valid = [n for n, v in intervals.items() if v is not None and math.isfinite(v[0])]
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(valid, key=lambda n: sign * intervals[n][0])  # type: ignore[index]
    groups: list[dict[str, Any]] = []
    placed: set[str] = set()
    for leader in order:
        if leader in placed:
            continue
        _, low, high = intervals[leader]  # type: ignore[misc]
        members = [leader] + [
            n
            for n in order
            if n not in placed and n != leader and intervals[n][1] <= high and low <= intervals[n][2]  # type: ignore[index]
        ]
        groups.append({"rank": len(placed) + 1, "members": members})
        placed.update(members)
    for name in intervals:
        if name not in placed:
            groups.append({"rank": len(placed) + 1, "members": [name]})
            placed.add(name)
    return groups
