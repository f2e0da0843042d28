"""descend.experiments: one function and one figure per claim about training.

Each experiment trains small models on the digits data (or a quadratic) with descend's own
optimizers and networks, and measures one claim:

- ``gd-vs-sgd``: minibatch SGD reaches full-batch GD's final loss touching fewer examples.
- ``momentum-noise``: EMA momentum lowers the step-to-step variance of the update direction.
- ``badly-scaled``: sign, softsign and Adam ignore gradient magnitudes that cripple GD.
- ``adam-softsign``: Adam's update direction is close to softsign momentum's.
- ``weight-decay``: decay narrows the train/test gap; decoupled decay confines sign methods to ``|w| <= 1/lambda``.
- ``depth``: plain deep sigmoid/tanh nets lose their gradient; residual nets keep it.
- ``point-sets``: attention over (location, value) points does not care about their order; a flat MLP does.

    from descend import experiments
    numbers = experiments.run("gd-vs-sgd", Path("out"))     # out/gd-vs-sgd.png, out/gd-vs-sgd.json
    experiments.run_all(Path("out"), quick=True)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from descend.experiments._adam_softsign import adam_softsign
from descend.experiments._common import Outcome, save_figure, save_json
from descend.experiments._depth import depth
from descend.experiments._gd_vs_sgd import gd_vs_sgd
from descend.experiments._momentum import momentum_noise
from descend.experiments._point_sets import point_sets
from descend.experiments._scaling import badly_scaled
from descend.experiments._weight_decay import weight_decay

#: Experiment name -> function ``(*, quick, seed) -> Outcome``.
EXPERIMENTS: dict[str, Callable[..., Outcome]] = {
    "gd-vs-sgd": gd_vs_sgd,
    "momentum-noise": momentum_noise,
    "badly-scaled": badly_scaled,
    "adam-softsign": adam_softsign,
    "weight-decay": weight_decay,
    "depth": depth,
    "point-sets": point_sets,
}


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads: these models are tiny, and extra threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(name: str, out_dir: Path, *, quick: bool = False, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run experiment ``name``; write ``out_dir/<name>.png`` and ``out_dir/<name>.json``; return its numbers.

    ``quick`` shortens the runs (fewer steps or examples; the tests use it). ``seed`` fixes the
    initialisation and the data order. The finding is printed as a few lines of numbers unless
    ``verbose`` is false. The returned dict holds the measured numbers, plus ``finding`` (the printed
    lines), ``seconds`` (wall time) and ``figure``/``json`` (the paths written).
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} (or 'all')")
    out_dir = Path(out_dir)
    start = time.perf_counter()
    with _threads(1):
        outcome = EXPERIMENTS[name](quick=quick, seed=seed)
    seconds = time.perf_counter() - start
    figure, json_path = out_dir / f"{name}.png", out_dir / f"{name}.json"
    numbers = {**outcome.numbers, "finding": outcome.finding, "seconds": seconds, "quick": quick, "seed": seed}
    save_figure(outcome.figure, figure)
    save_json(numbers, json_path)
    if verbose:
        print(f"[{name}] ({seconds:.1f} s) -> {figure}")
        for line in outcome.finding:
            print(f"  {line}")
    return {**numbers, "figure": str(figure), "json": str(json_path)}


def run_all(out_dir: Path, *, quick: bool = False, seed: int = 0, verbose: bool = True) -> dict[str, dict[str, Any]]:
    """Run every experiment in :data:`EXPERIMENTS` in order; ``{name: numbers}`` (see :func:`run`)."""
    return {name: run(name, out_dir, quick=quick, seed=seed, verbose=verbose) for name in EXPERIMENTS}


__all__ = ["EXPERIMENTS", "Outcome", "run", "run_all"]
