"""Compare optimizers fairly: a short learning-rate sweep each, then the best LR over several seeds.

For each optimizer ``o`` with default rate ``η_o`` (:data:`~descend.train.DEFAULT_LR`):

1. sweep: train ``sweep_steps`` steps at ``η_o · m`` for each multiplier ``m`` (seed 0) and score the
   final *validation* metric (accuracy for classification, ``-loss`` for regression; diverged = -inf);
2. final: train ``steps`` steps at the best rate for seeds ``0 .. seeds-1`` and report the *test*
   metric (mean ± std), plus the steps and seconds until the validation metric first reaches ``goal``.

Every run uses the same data split, model and step budget; only the optimizer and its LR change.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from descend import optim
from descend.data.registry import load_data
from descend.train._build import DEFAULT_LR, FULL_BATCH, OPTIMIZER_NAMES, build_model, make_optimizer
from descend.train._run import RunError, _opt, _spec_from_dict
from descend.train._trainer import NonFiniteLossError, TrainConfig, Trainer, seed_everything

__all__ = ["CompareSpec", "compare"]


@dataclass
class CompareSpec:
    """Every option of ``descend compare``; the defaults finish in well under 3 minutes on 2 CPU cores."""

    data: str = _opt("digits", "dataset: digits, digits-points, shapes, gp1d, or a .csv/.npz path")
    target: str | None = _opt(None, "label column of a CSV file")
    task: str | None = _opt(None, "classification or regression (default: inferred)")
    model: str = _opt("mlp", "linear, mlp, resmlp or pointset")
    depth: int = _opt(2, "hidden layers / blocks")
    width: int = _opt(64, "hidden width")
    activation: str = _opt("relu", "relu, tanh, sigmoid or gelu")
    optimizers: str = _opt(",".join(OPTIMIZER_NAMES), "comma-separated optimizer names")
    seeds: int = _opt(3, "seeds per optimizer at its best learning rate")
    steps: int = _opt(600, "optimizer steps of each final run")
    batch_size: int = _opt(32, "minibatch size (gd always uses the full batch)")
    sweep: str = _opt("0.1,0.3,1,3,10", "LR multipliers of each optimizer's default rate tried in the sweep")
    sweep_steps: int = _opt(300, "optimizer steps of each sweep run")
    eval_every: int = _opt(25, "steps between validations (the curves' resolution)")
    weight_decay: float | None = _opt(None, "optimizer weight decay (default: each optimizer's own)")
    l2: float = _opt(0.0, "L2 penalty λ in the loss")
    goal: float | None = _opt(None, "validation target: accuracy (default 0.95) or loss for regression")
    seed: int = _opt(0, "seed of the data split")
    threads: int | None = _opt(1, "torch CPU threads (small models run fastest on one); 0: torch's default")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompareSpec:
        return _spec_from_dict(cls, values)

    def optimizer_list(self) -> list[str]:
        names = [n.strip().lower() for n in self.optimizers.split(",") if n.strip()]
        for n in names:
            if n not in OPTIMIZER_NAMES:
                raise RunError(f"unknown optimizer {n!r} in --optimizers; choose from {', '.join(OPTIMIZER_NAMES)}")
        if not names:
            raise RunError("--optimizers is empty; give comma-separated names, e.g. sgd,adam")
        return names

    def multipliers(self) -> list[float]:
        try:
            values = [float(m) for m in self.sweep.split(",") if m.strip()]
        except ValueError as e:
            raise RunError(f"--sweep must be comma-separated numbers, got {self.sweep!r}") from e
        if not values or any(not m > 0 for m in values):
            raise RunError(f"--sweep needs positive LR multipliers, got {self.sweep!r}")
        return values


def _score(metrics: dict[str, float], task: str) -> float:
    return metrics["accuracy"] if task == "classification" else -metrics["loss"]


def _first_reaching(
    history: list[dict[str, Any]], key: str, goal: float, higher: bool
) -> tuple[int | None, float | None]:
    for row in history:
        value = row.get(key)
        if value is not None and (value >= goal if higher else value <= goal):
            return int(row["step"]), float(row["seconds"])
    return None, None


def compare(spec: CompareSpec, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the sweep and the seeded final runs for every optimizer; return everything as JSON-able data.

    Result keys: ``spec``, ``task``, ``metric``, ``goal``, ``seconds``, ``ranking`` (best first) and
    ``optimizers[name]`` with ``lr``, ``sweep`` (lr, score), ``runs`` (per seed: test/val metrics,
    ``steps_to_goal``, ``seconds_to_goal``, the metric ``history``), ``test_mean``/``test_std``,
    ``equations``.
    """
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        return _compare(spec, log)
    finally:
        torch.set_num_threads(threads)


def _compare(spec: CompareSpec, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    names, multipliers = spec.optimizer_list(), spec.multipliers()
    if spec.seeds < 1 or spec.steps < 1 or spec.sweep_steps < 1:
        raise RunError("--seeds, --steps and --sweep-steps must be >= 1")
    bundle = load_data(spec.data, target=spec.target, task=spec.task, seed=spec.seed)  # type: ignore[arg-type]
    task = bundle.task
    metric = "accuracy" if task == "classification" else "loss"
    goal = spec.goal if spec.goal is not None else (0.95 if task == "classification" else None)

    def run(name: str, lr: float, seed: int, steps: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        seed_everything(seed)
        try:
            model = build_model(spec.model, bundle, depth=spec.depth, width=spec.width, activation=spec.activation)
            opt = make_optimizer(name, model.parameters(), lr=lr, weight_decay=spec.weight_decay)
        except ValueError as e:
            raise RunError(str(e)) from e
        config = TrainConfig(
            steps=steps,
            batch_size=None if name in FULL_BATCH else spec.batch_size,
            l2=spec.l2,
            seed=seed,
            eval_every=spec.eval_every,
            log_every=max(1, spec.eval_every // 5),
            progress=False,
            tensorboard=False,
        )
        trainer = Trainer(model, opt, bundle, config)
        try:
            summary = trainer.fit()
        except NonFiniteLossError:
            trainer.close()
            return {"diverged": True}, trainer.history
        return {"diverged": False, **summary}, trainer.history

    results: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        sweep = []
        for m in multipliers:
            lr = DEFAULT_LR[name] * m
            summary, _ = run(name, lr, 0, spec.sweep_steps)
            score = -math.inf if summary["diverged"] else _score(summary["val"], task)
            if not math.isfinite(score):
                score = -math.inf
            sweep.append({"lr": lr, "score": score, "diverged": summary["diverged"]})
        best = max(sweep, key=lambda s: (s["score"], -abs(math.log(s["lr"] / DEFAULT_LR[name]))))
        runs = []
        for seed in range(spec.seeds):
            summary, history = run(name, best["lr"], seed, spec.steps)
            entry: dict[str, Any] = {"seed": seed, "diverged": summary["diverged"], "history": history}
            if not summary["diverged"]:
                key = f"val_{metric}"
                steps_to, seconds_to = (
                    _first_reaching(history, key, goal, metric == "accuracy") if goal is not None else (None, None)
                )
                entry.update(
                    test=summary["test"],
                    val=summary["val"],
                    seconds=summary["seconds"],
                    steps_to_goal=steps_to,
                    seconds_to_goal=seconds_to,
                )
            runs.append(entry)
        finals = [r["test"][metric] for r in runs if not r["diverged"]]
        reached = [r for r in runs if r.get("steps_to_goal") is not None]
        probe = make_optimizer(
            name, [torch.zeros(1, requires_grad=True)], lr=best["lr"], weight_decay=spec.weight_decay
        )
        results[name] = {
            "lr": best["lr"],
            "sweep": sweep,
            "runs": runs,
            "test_mean": statistics.fmean(finals) if finals else math.nan,
            "test_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "diverged": len(runs) - len(finals),
            "reached_goal": len(reached),
            "steps_to_goal": statistics.fmean(r["steps_to_goal"] for r in reached) if reached else None,
            "seconds_to_goal": statistics.fmean(r["seconds_to_goal"] for r in reached) if reached else None,
            "seconds": statistics.fmean(r["seconds"] for r in runs if not r["diverged"]) if finals else None,
            "equations": optim.explain(probe),
            "wall_seconds": time.perf_counter() - t0,
        }
        log(
            f"{name:<9} lr={best['lr']:.3g}  test {metric} {results[name]['test_mean']:.4f} "
            f"± {results[name]['test_std']:.4f}  ({results[name]['wall_seconds']:.1f}s)"
        )
    sign = 1 if metric == "accuracy" else -1
    ranking = sorted(
        results,
        key=lambda n: -math.inf if math.isnan(results[n]["test_mean"]) else sign * results[n]["test_mean"],
        reverse=True,
    )
    return {
        "spec": asdict(spec),
        "data": bundle.name,
        "task": task,
        "metric": metric,
        "goal": goal,
        "ranking": ranking,
        "optimizers": results,
        "seconds": time.perf_counter() - started,
    }
