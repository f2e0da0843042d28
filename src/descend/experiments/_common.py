"""What every experiment shares: its outcome and findings, seeds, tuning, plotting, the digits data.

A *finding* is a claim checked separately on every seed; it carries how many seeds it holds on, so
what is printed and documented is computed from the runs, never typed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from descend.compare._tuning import TuneResult, seed_stats, tune_lr

DPI = 100

#: Okabe & Ito's colour-blind-safe palette; yellow, hard to see on white, comes last.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")

#: Default number of seeds: full mode and ``quick`` mode.
FULL_SEEDS, QUICK_SEEDS = 5, 2


@dataclass
class Finding:
    """One claim, checked on each seed: it holds on ``holds`` of ``seeds`` seeds.

    ``key`` names it for tests and the JSON; ``text`` states it in words, numbers included.
    """

    key: str
    text: str
    holds: int
    seeds: int

    @property
    def robust(self) -> bool:
        """Whether the claim holds on every seed."""
        return self.holds == self.seeds

    def line(self) -> str:
        return f"{self.text} (on {self.holds} of {self.seeds} seeds)"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "text": self.text, "holds": self.holds, "seeds": self.seeds, "line": self.line()}


def finding(key: str, text: str, per_seed: Sequence[bool]) -> Finding:
    """A :class:`Finding` from one boolean per seed (whether the claim holds on that seed)."""
    flags = [bool(v) for v in per_seed]
    return Finding(key, text, sum(flags), len(flags))


@dataclass
class Outcome:
    """What an experiment returns: its numbers, figure, findings (claims over seeds) and notes.

    ``notes`` are lines of measured numbers that claim nothing (means and ranges over seeds).
    """

    numbers: dict[str, Any]
    figure: Figure
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def finding(self) -> list[str]:
        """Every printed line: the findings with their seed counts, then the notes."""
        return [f.line() for f in self.findings] + self.notes


def seed_list(quick: bool, seed: int = 0, n: int | None = None) -> list[int]:
    """Seeds ``seed .. seed + n - 1``; ``n`` defaults to 5 (2 with ``quick``)."""
    count = (QUICK_SEEDS if quick else FULL_SEEDS) if n is None else n
    if count < 1:
        raise ValueError(f"the number of seeds must be >= 1, got {count}")
    return list(range(seed, seed + count))


def span(values: Sequence[float], fmt: str = ".3g") -> str:
    """``"mean (min..max)"`` of ``values`` over seeds."""
    s = seed_stats([float(v) for v in values])
    return f"{s.mean:{fmt}} ({s.min:{fmt}}..{s.max:{fmt}})"


def tune(run: Callable[[float, int], Any], grid: Sequence[float], seeds: Sequence[int],
         max_extensions: int = 4) -> TuneResult:
    """:func:`descend.compare._tuning.tune_lr`: the grid extended while its best (mean over seeds) is at an edge."""
    return tune_lr(run, grid, seeds, max_extensions=max_extensions)


def tuned_dict(result: TuneResult) -> dict[str, Any]:
    """A tuning result for the JSON: the grid, its mean validation losses, the chosen rate, ``at_edge``."""
    out = result.to_dict()
    out["mean_val_loss"] = [v if math.isfinite(v) else None for v in out["mean_val_loss"]]
    return out


# --- figures ---------------------------------------------------------------------------------------


def new_figure(ncols: int, width: float = 4.2, height: float = 3.4, nrows: int = 1) -> tuple[Figure, list[Any]]:
    """A matplotlib ``Figure`` (no pyplot, so no global state) with ``nrows x ncols`` axes, row-major."""
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    for ax in axes:
        ax.set_prop_cycle(color=list(PALETTE))
    return fig, axes


def band(ax: Any, x: Sequence[float], curves: Sequence[Sequence[float]], color: str, label: str,
         linestyle: str = "-") -> None:
    """Mean over seeds as a line and the min-max over seeds as a shaded band.

    ``curves`` is one curve per seed, all of ``len(x)``. A non-finite value (a diverged seed) is not
    clamped: the mean and band are left undrawn at that point, and the label says how many diverged.
    """
    t = torch.tensor([list(map(float, c)) for c in curves], dtype=torch.float64)
    bad = ~torch.isfinite(t)
    diverged = int(bad.any(1).sum())
    t = t.masked_fill(bad, float("nan"))
    mean, lo, hi = t.mean(0), t.amin(0), t.amax(0)  # NaN propagates: undrawn where any seed diverged
    if diverged:
        label = f"{label} ({diverged} of {len(curves)} seeds diverged)"
    xs = list(map(float, x))
    ax.plot(xs, mean.tolist(), color=color, linestyle=linestyle, label=label, linewidth=1.5)
    ax.fill_between(xs, lo.tolist(), hi.tolist(), color=color, alpha=0.2, linewidth=0)


# --- data and small loops --------------------------------------------------------------------------


class Digits(NamedTuple):
    """Standardised digits: train ``[1258, 64]``, validation and test splits (labels ``0..9``)."""

    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


@lru_cache(maxsize=16)
def digits(seed: int = 0) -> Digits:
    """The digits split by ``seed`` (:func:`descend.data.tabular.load_digits`), standardised on train."""
    from descend.data.tabular import load_digits

    b = load_digits(seed=seed)
    return Digits(b.train.inputs[0], b.train.targets, b.val.inputs[0], b.val.targets, b.test.inputs[0], b.test.targets)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """All tensors concatenated into one 1-D float64 vector."""
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def loss_of(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> float:
    """Mean loss (cross-entropy unless ``loss_fn``) of ``model`` on ``(x, y)``, without gradients; inf if not finite."""
    with torch.no_grad():
        value = float((loss_fn or nn.functional.cross_entropy)(model(x), y))
    return value if math.isfinite(value) else math.inf


def accuracy(model: nn.Module, inputs: tuple[Tensor, ...], y: Tensor) -> float:
    """Share of ``y`` that ``model(*inputs)`` classifies correctly, without gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(*inputs).argmax(-1) == y).double().mean())
    model.train(was_training)
    return acc
