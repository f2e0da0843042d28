"""Compare optimizers on named workloads: fair learning-rate tuning, several seeds, honest statistics.

For every task ``k`` (:mod:`descend.compare._tasks`) and optimizer ``o``:

1. **tune**: :func:`~descend.compare._tuning.tune_lr` trains the task's full step budget at each rate of
   the log grid ``η_o · c_k · m`` (``η_o`` the default rate, ``c_k`` the task's scale, ``m`` the
   multipliers, half a decade apart by default) for the tuning seeds, scores a rate by the mean over
   those seeds of the final *validation loss* (a diverged seed is the worst score) and extends the
   grid while the best rate sits at an edge;
2. **final**: trains at the chosen rate for ``seeds`` seeds ``0 .. seeds-1`` (a tuning run at that rate
   and seed is reused, not repeated); a seed has *diverged* when its loss becomes NaN/inf or its
   validation loss ends above where it started (the trainer's divergence check);
3. **statistics**: the final *test* metric over the seeds that did not diverge, as mean with a 95%
   Student-t interval (:func:`~descend.compare._tuning.seed_stats`). A seed has *reached* the target
   when its final validation metric meets it; its steps (seconds) to target are those of the first
   evaluation from which the validation metric meets the target until the end of the run; the table
   gives their (lower) median over the seeds that reached it, with the count.

Ranking within a task: by mean final test metric; an optimizer whose interval overlaps the interval
of its group's leader (the best not yet grouped) shares that rank, so a rank states only differences
that the seeds support. Across tasks: the performance profile of AlgoPerf/Dolan-Moré,
``ρ_o(τ) = |{k : t_{o,k} ≤ τ · min_p t_{p,k}}| / |tasks|``, where ``t_{o,k}`` is the median time
(or steps) to target over the seeds if at least half of them reached it, else infinite.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from descend import optim
from descend._options import CompareSpec, OptionError
from descend._random import seed_everything
from descend.compare._tasks import SUITES, TASKS, Task, load_task_data, suite_tasks
from descend.compare._tuning import seed_stats, tie_groups, tune_lr
from descend.data._base import DataBundle
from descend.runs._run import RunError
from descend.train._build import DEFAULT_LR, FULL_BATCH, make_optimizer
from descend.train._device import resolve_device
from descend.train._trainer import NonFiniteLossError, TrainConfig, Trainer

__all__ = [
    "CompareSpec",
    "compare",
    "describe_tasks",
    "performance_profile",
    "resolve_plan",
    "run_task_optimizer",
    "summarise",
    "time_to_target",
]

#: Multipliers of each optimizer's grid centre: half a decade apart.
DEFAULT_GRID = (10**-0.5, 1.0, 10**0.5)


def resolve_plan(spec: CompareSpec) -> dict[str, Any]:
    """The tasks, optimizers, seeds and grid a spec asks for (suite defaults filled in); ``RunError`` if bad.

    ``suite`` is the suite's name when the run is exactly its tasks and optimizers, else ``None``;
    ``label`` names what runs: ``"quick suite"``, or the tasks and optimizers of a custom run.
    """
    if spec.suite not in SUITES:
        raise RunError(f"unknown suite {spec.suite!r}; choose from {', '.join(SUITES)}")
    suite_task_names, suite_optimizers, suite_seeds, suite_tune_seeds = SUITES[spec.suite]
    try:
        tasks = suite_tasks(spec.task) if spec.task else [TASKS[n] for n in suite_task_names]
    except ValueError as e:
        raise RunError(str(e)) from e
    try:
        optimizers = list(dict.fromkeys(spec.optimizer_list())) or list(suite_optimizers)
        grid = spec.multipliers() or list(DEFAULT_GRID)
    except OptionError as e:
        raise RunError(str(e)) from e
    seeds = spec.seeds or suite_seeds
    tune_seeds = spec.tune_seeds or suite_tune_seeds
    names = [t.name for t in tasks]
    is_suite = names == list(suite_task_names) and optimizers == list(suite_optimizers)
    return {
        # a run of other tasks or optimizers than the suite's is labelled by what it ran, not by the suite
        # whose seeds and defaults it borrowed
        "suite": spec.suite if is_suite else None,
        "label": f"{spec.suite} suite" if is_suite else f"{', '.join(names)}: {', '.join(optimizers)}",
        "tasks": names,
        "optimizers": optimizers,
        "seeds": seeds,
        "tune_seeds": min(tune_seeds, seeds),
        "grid": grid,
        "max_extensions": spec.max_extensions,
        "steps": spec.steps,
    }


def time_to_target(history: list[dict[str, Any]], task: Task) -> tuple[int | None, float | None]:
    """``(step, seconds)`` of the first evaluation from which the validation metric meets the target
    through the end of the run; ``(None, None)`` if the final evaluation misses it."""
    key = f"val_{task.metric}"
    rows = [r for r in history if isinstance(r.get(key), (int, float))]
    hit: dict[str, Any] | None = None
    for row in rows:
        if task.reached(float(row[key])):
            hit = hit or row
        else:
            hit = None
    return (int(hit["step"]), float(hit["seconds"])) if hit is not None else (None, None)


def run_once(task: Task, optimizer: str, lr: float, seed: int, *, steps: int | None = None, device: str | None = None,
             bundle: DataBundle | None = None) -> dict[str, Any]:
    """Train ``task``'s model with ``optimizer`` at ``lr`` from ``seed``; one JSON-able record.

    Keys: ``seed``, ``lr``, ``diverged``, ``val``/``test`` (final metrics; absent when diverged),
    ``seconds`` and ``steps`` run, ``reached``, ``steps_to_target``, ``seconds_to_target`` and the
    ``history`` (one row per evaluation: ``step``, ``seconds``, ``loss`` (training minibatch),
    ``val_loss`` and, for classification, ``val_accuracy``).
    """
    data = bundle or load_task_data(task.data)
    seed_everything(seed)
    model = task.model(data)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr)
    budget = steps or task.steps
    config = TrainConfig(
        steps=budget,
        batch_size=None if (optimizer in FULL_BATCH or task.batch_size is None) else task.batch_size,
        seed=seed,
        l2=0.0,  # a comparison measures the optimizer alone, on the final weights
        restore_best=False,
        eval_every=min(task.eval_every, budget),
        log_every=min(task.eval_every, budget),
        progress=False,
        tensorboard=False,
    )
    trainer = _CompareTrainer(model, opt, data, config, device=device or None)  # the trainer moves model and batches
    record: dict[str, Any] = {"seed": seed, "lr": lr}
    started, cpu = time.perf_counter(), time.process_time()
    try:
        summary = trainer.fit()
    except NonFiniteLossError:
        trainer.close()
        record.update(diverged=True, seconds=time.perf_counter() - started, steps=trainer.step)
        record["cpu_seconds"] = time.process_time() - cpu
        record.update(reached=False, steps_to_target=None, seconds_to_target=None)
        record["history"] = _evaluation_rows(trainer.history)
        return record
    history = _evaluation_rows(trainer.history)
    final_val = summary["val"][task.metric]
    finite = all(math.isfinite(v) for v in (*summary["val"].values(), *summary["test"].values()))
    start = summary.get("val_loss_start")
    # a comparison also counts a seed whose validation loss ended above where it started as failed
    risen = start is not None and summary["val"]["loss"] > start
    diverged = not finite or bool(getattr(trainer, "diverged", False)) or risen
    step_to, seconds_to = time_to_target(history, task)
    record.update(
        diverged=diverged,
        val=summary["val"],
        test=summary["test"],
        seconds=summary["seconds"],
        cpu_seconds=time.process_time() - cpu,
        steps=summary["steps"],
        reached=(not diverged) and task.reached(final_val) and step_to is not None,
        steps_to_target=step_to,
        seconds_to_target=seconds_to,
        history=history,
    )
    return record


class _CompareTrainer(Trainer):
    """The trainer, less the evaluation of the whole training split at the end (compare reports validation
    and test; on ``text-lm`` that evaluation would cost as much as the run), with its warnings kept in
    ``notes`` rather than printed (a diverged tuning run is expected, and counted in the results)."""

    notes: list[str]

    def warn(self, message: str) -> None:
        self.__dict__.setdefault("notes", []).append(message)

    def summary(self) -> dict[str, Any]:
        return {"val": self.evaluate("val"), "test": self.evaluate("test"), "steps": self.step, "seconds": self.seconds}


_EVALUATION_KEYS = ("step", "seconds", "loss", "val_loss", "val_accuracy")


def _evaluation_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation rows of a training history, with the columns a comparison keeps."""
    return [{k: r[k] for k in _EVALUATION_KEYS if k in r} for r in history if "val_loss" in r]


def grid_for(task: Task, optimizer: str, multipliers: Sequence[float]) -> list[float]:
    """The tuning grid ``η_o · c_k · m`` for each multiplier ``m`` (3 significant digits)."""
    centre = DEFAULT_LR[optimizer] * task.lr_scale.get(optimizer, 1.0)
    return sorted({float(f"{centre * m:.3g}") for m in multipliers})


def run_task_optimizer(task_name: str, optimizer: str, plan: dict[str, Any], device: str | None = None,
                       threads: int | None = None) -> dict[str, Any]:
    """Tune ``optimizer`` on ``task_name`` and run its seeds (one unit of work; runs in a worker process).

    Returns the ``tuning`` (:meth:`TuneResult.to_dict` plus the runs' count and seconds), the
    per-seed ``runs`` at the chosen ``lr`` and the ``equations`` of the update.
    """
    if threads:
        torch.set_num_threads(threads)
    task = TASKS[task_name]
    bundle = load_task_data(task.data)
    steps = plan.get("steps")
    started = time.perf_counter()

    def run(lr: float, seed: int) -> tuple[float, dict[str, Any]]:
        record = run_once(task, optimizer, lr, seed, steps=steps, device=device, bundle=bundle)
        loss = math.inf if record["diverged"] else float(record["val"]["loss"])
        return loss, record

    tuned = tune_lr(
        run,
        grid_for(task, optimizer, plan["grid"]),
        seeds=list(range(plan["tune_seeds"])),
        max_extensions=plan["max_extensions"],
    )
    lr = tuned.best_lr
    reused = dict(enumerate(tuned.details[lr]))
    runs = [reused[s] if s in reused else run(lr, s)[1] for s in range(plan["seeds"])]
    probe = make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)], lr=lr)
    tuning_cpu = sum(r["cpu_seconds"] for records in tuned.details.values() for r in records)
    return {
        "lr": lr,
        "tuning": {**tuned.to_dict(), "seeds": plan["tune_seeds"], "cpu_seconds": tuning_cpu},
        "runs": runs,
        "equations": optim.explain(probe),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": tuning_cpu + sum(r["cpu_seconds"] for s, r in enumerate(runs) if s not in reused),
    }


def _summarise(task: Task, entry: dict[str, Any]) -> dict[str, Any]:
    runs = entry["runs"]
    ok = [r for r in runs if not r["diverged"]]
    finals = [float(r["test"][task.metric]) for r in ok]
    vals = [float(r["val"][task.metric]) for r in ok]
    reached = [r for r in runs if r["reached"]]
    return {
        "seeds": len(runs),
        "diverged": len(runs) - len(ok),
        "test": seed_stats(finals).to_dict() if finals else None,
        "val": seed_stats(vals).to_dict() if vals else None,
        "reached": len(reached),
        # the lower median: a value one of the seeds actually took (never 137.5 steps)
        "steps_to_target": statistics.median_low(r["steps_to_target"] for r in reached) if reached else None,
        "seconds_to_target": statistics.median_low(r["seconds_to_target"] for r in reached) if reached else None,
        "seconds_per_run": statistics.median(r["seconds"] for r in runs),
    }


def performance_profile(times: dict[str, dict[str, float]], taus: Sequence[float]) -> dict[str, list[float]]:
    """``ρ_o(τ)`` for each optimizer ``o`` and each ``τ`` in ``taus``, from ``times[task][o]`` (``inf``: missed).

    A task that no optimizer solved counts against every optimizer (its ratio is infinite for all).
    """
    tasks = list(times)
    optimizers = list(dict.fromkeys(o for t in tasks for o in times[t]))
    ratios: dict[str, list[float]] = {o: [] for o in optimizers}
    for t in tasks:
        best = min(times[t].values(), default=math.inf)
        for o in optimizers:
            value = times[t].get(o, math.inf)
            ratios[o].append(value / best if math.isfinite(value) and best > 0 else math.inf)
    n = max(len(tasks), 1)
    return {o: [sum(r <= tau for r in ratios[o]) / n for tau in taus] for o in optimizers}


def _profile_time(summary: dict[str, Any], key: str) -> float:
    """Median time (or steps) to target if at least half of the seeds reached it, else ``inf``."""
    if summary["reached"] * 2 < summary["seeds"] or summary[key] is None:
        return math.inf
    return float(summary[key])


PROFILE_TAUS = tuple(round(1 + 0.05 * i, 2) for i in range(20)) + tuple(round(2 + 0.25 * i, 2) for i in range(33))


def _execute(jobs: list[tuple[str, str]], plan: dict[str, Any], spec: CompareSpec,
             log: Callable[[str], None]) -> dict[tuple[str, str], dict[str, Any]]:
    done: dict[tuple[str, str], dict[str, Any]] = {}

    def note(key: tuple[str, str], result: dict[str, Any]) -> None:
        done[key] = result
        t = result["tuning"]
        edge = " (still at the grid's edge)" if t["at_edge"] else ""
        log(
            f"{key[0]:<16} {key[1]:<9} lr={result['lr']:.3g}{edge}  tuning {t['runs']} runs "
            f"{t['seconds']:.1f}s, total {result['seconds']:.1f}s  [{len(done)}/{len(jobs)}]"
        )

    workers = min(spec.workers, len(jobs))
    if workers <= 1:
        for key in jobs:
            note(key, run_task_optimizer(*key, plan, spec.device, spec.threads))
        return done
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_task_optimizer, *key, plan, spec.device, spec.threads): key for key in jobs}
        for future in cf.as_completed(futures):
            note(futures[future], future.result())
    return done


def compare(spec: CompareSpec, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the comparison ``spec`` asks for; return everything as JSON-able data.

    Keys: ``spec``, ``plan`` (tasks, optimizers, seeds, grid), ``tasks[name]`` (the task's
    description, metric, target, ``ranking`` groups and ``optimizers[name]`` with ``lr``,
    ``tuning``, ``runs``, ``summary``, ``equations``), ``profile`` (``taus`` and ``ρ`` by time and by
    steps), ``summary`` (one row per optimizer across tasks), ``seconds``, ``environment``.
    """
    started, load_before = time.perf_counter(), _load_average()
    plan = resolve_plan(spec)
    previous = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        for name in plan["tasks"]:  # fail on missing data before any training
            load_task_data(TASKS[name].data)
        jobs = [(t, o) for t in plan["tasks"] for o in plan["optimizers"]]
        done = _execute(jobs, plan, spec, log)
    finally:
        torch.set_num_threads(previous)
    tasks: dict[str, Any] = {}
    for name in plan["tasks"]:
        task = TASKS[name]
        tasks[name] = {
            "description": task.describe(),
            "summary": task.summary,
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "target": task.target,
            "unit": task.unit,
            "steps": plan["steps"] or task.steps,
            "batch_size": task.batch_size,
            "optimizers": {o: done[(name, o)] for o in plan["optimizers"]},
        }
    results = {
        "spec": asdict(spec),
        "plan": plan,
        "tasks": tasks,
        "seconds": time.perf_counter() - started,
        "environment": {
            "torch": torch.__version__,
            "threads_per_run": spec.threads or torch.get_num_threads(),
            "workers": min(spec.workers, len(plan["tasks"]) * len(plan["optimizers"])),
            "cpu_seconds_of_runs": sum(e["cpu_seconds"] for t in tasks.values() for e in t["optimizers"].values()),
            "cpus": os.cpu_count(),
            "load_average": [load_before, _load_average()],  # 1-minute load at the start and the end: others' work too
            "device": str(resolve_device(spec.device or None)),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }
    return summarise(results)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Fill in the statistics of ``results`` from its per-seed runs: each unit's ``summary``, each task's
    ``ranking``, the ``profile`` and the cross-task ``summary``. :func:`compare` ends with it; applied to a
    loaded ``results.json`` it recomputes them with this version's rules. Returns ``results``."""
    tasks = results["tasks"]
    for name, info in tasks.items():
        task = TASKS[name]
        for entry in info["optimizers"].values():
            entry["summary"] = _summarise(task, entry)
        stats = {o: e["summary"]["test"] for o, e in info["optimizers"].items()}
        info["ranking"] = tie_groups(
            {o: (s["mean"], s["low"], s["high"]) if s else None for o, s in stats.items()},
            higher_is_better=task.higher_is_better,
        )
    profile: dict[str, Any] = {"taus": list(PROFILE_TAUS)}
    for key in ("seconds_to_target", "steps_to_target"):
        times = {t: {o: _profile_time(e["summary"], key) for o, e in tasks[t]["optimizers"].items()} for t in tasks}
        profile[key] = performance_profile(times, PROFILE_TAUS)
    results["profile"] = profile
    results["summary"] = summary_rows(tasks, results["plan"]["optimizers"])
    return results


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not on every platform
        return None


def summary_rows(tasks: dict[str, Any], optimizers: Sequence[str]) -> list[dict[str, Any]]:
    """One row per optimizer across tasks: rank per task, tasks reached, divergences, tuning cost."""
    rows = []
    for o in optimizers:
        row: dict[str, Any] = {"optimizer": o, "ranks": {}, "reached": 0, "diverged": 0, "runs": 0, "seconds": 0.0}
        row["cpu_seconds"] = 0.0
        for t, info in tasks.items():
            entry = info["optimizers"][o]
            s = entry["summary"]
            rank = next(g["rank"] for g in info["ranking"] if o in g["members"])
            tied = next(len(g["members"]) > 1 for g in info["ranking"] if o in g["members"])
            row["ranks"][t] = f"{rank}=" if tied else str(rank)
            row["reached"] += int(s["reached"] * 2 >= s["seeds"])
            row["diverged"] += s["diverged"]
            row["runs"] += entry["tuning"]["runs"] + max(0, s["seeds"] - entry["tuning"]["seeds"])
            row["seconds"] += entry["seconds"]
            row["cpu_seconds"] += entry["cpu_seconds"]
        row["tasks"] = len(tasks)
        rows.append(row)
    return rows


def describe_tasks() -> str:
    """``descend compare --list``: every task with its budget and target, then the suites."""
    lines = ["tasks:"]
    for task in TASKS.values():
        lines.append(f"  {task.name:<16} {task.describe()}")
    lines.append("suites:")
    for name, (tasks, optimizers, seeds, tune_seeds) in SUITES.items():
        lines.append(
            f"  {name:<16} tasks {', '.join(tasks)}; optimizers {', '.join(optimizers)}; "
            f"{tune_seeds} tuning seed(s), {seeds} final seeds"
        )
    return "\n".join(lines)
