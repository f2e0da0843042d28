"""descend.experiments: one figure per idea about training, each claim measured over seeds.

Every experiment runs several seeds (5 by default, 2 with ``quick``), tunes each method's learning
rate on a grid extended while its best point is at an edge (:func:`descend.compare._tuning.tune_lr`,
scored by the mean final validation loss over seeds, or on separately drawn problems where there is
no data), separately at every setting it reports; reports every loss and accuracy on test data used
for no choice; plots the mean over seeds with a min-max band; and states each finding with the
number of seeds it holds on ("on 5 of 5 seeds").

    from descend import experiments
    numbers = experiments.run("momentum", Path("out"))        # out/momentum.png, out/momentum.json
    experiments.run_all(Path("out"), quick=True)
    page = experiments.render_markdown(Path("out"))            # the docs page, from the JSON files

``descend experiments NAME|all [--quick] [--seed S] [--out DIR]`` is the same from the command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from descend._io import atomic_path, write_json
from descend.experiments._adam_softsign import adam_softsign
from descend.experiments._common import DPI, Finding, Outcome, seed_list
from descend.experiments._depth import depth
from descend.experiments._flow_matching import flow_matching
from descend.experiments._function_approximation import function_approximation
from descend.experiments._gd_vs_sgd import gd_vs_sgd
from descend.experiments._momentum import momentum
from descend.experiments._neural_process import point_set_regression
from descend.experiments._point_sets import point_sets
from descend.experiments._scaling import badly_scaled
from descend.experiments._weight_decay import weight_decay

#: Experiment name -> function ``(*, quick, seeds) -> Outcome``, in the order ``all`` runs them.
EXPERIMENTS: dict[str, Callable[..., Outcome]] = {
    "momentum": momentum,
    "depth": depth,
    "weight-decay": weight_decay,
    "adam-softsign": adam_softsign,
    "gd-vs-sgd": gd_vs_sgd,
    "badly-scaled": badly_scaled,
    "point-sets": point_sets,
    "point-set-regression": point_set_regression,
    "function-approximation": function_approximation,
    "flow-matching": flow_matching,
}

#: Former names that still work.
ALIASES = {"momentum-noise": "momentum"}


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads: these models are tiny, and extra threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "nan": strict JSON has neither
    return value


def run(name: str, out_dir: Path, *, quick: bool = False, seed: int = 0, seeds: int | None = None,
        verbose: bool = True) -> dict[str, Any]:
    """Run experiment ``name``; write ``out_dir/<name>.png`` and ``out_dir/<name>.json``; return its numbers.

    The seeds are ``seed, seed + 1, ..., seed + seeds - 1``; ``seeds`` defaults to 5, or 2 with
    ``quick`` (which also shortens the runs; the tests use it). Each seed fixes the initialisation,
    the data order and, where the data is generated, the data. The returned dict holds the measured
    numbers plus ``findings`` (each claim with the seeds it holds on), ``finding`` (the printed
    lines), ``seeds``, ``seconds`` (wall time), ``cpu_seconds``
    (CPU time of this process), ``title`` and ``figure``/``json`` (the paths written).
    """
    name = ALIASES.get(name, name)
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} (or 'all')")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = seed_list(quick, seed, seeds)
    fn = EXPERIMENTS[name]
    start, cpu = time.perf_counter(), time.process_time()
    with _threads(1):
        outcome = fn(quick=quick, seeds=chosen)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    figure, json_path = out_dir / f"{name}.png", out_dir / f"{name}.json"
    doc = (fn.__doc__ or "").strip()
    numbers = {
        **outcome.numbers,
        "name": name,
        "title": " ".join(doc.split("\n\n", 1)[0].split()),  # the first paragraph, which may wrap
        "description": doc.split("\n\n", 1)[1].strip() if "\n\n" in doc else "",
        "findings": [f.to_dict() for f in outcome.findings],
        "notes": outcome.notes,
        "finding": outcome.finding,
        "seeds": chosen,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "quick": quick,
    }
    outcome.figure.tight_layout()
    buffer = io.BytesIO()
    outcome.figure.savefig(buffer, format="png", dpi=DPI)
    with atomic_path(figure) as tmp:
        tmp.write_bytes(buffer.getvalue())
    write_json(json_path, _jsonable(numbers), indent=1, allow_nan=False)
    if verbose:
        print(f"[{name}] {len(chosen)} seeds, {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU -> {figure}")
        for line in outcome.finding:
            print(f"  {line}")
    return {**numbers, "figure": str(figure), "json": str(json_path)}


def run_all(out_dir: Path, *, quick: bool = False, seed: int = 0, seeds: int | None = None,
            verbose: bool = True) -> dict[str, dict[str, Any]]:
    """Run every experiment in :data:`EXPERIMENTS` in order; ``{name: numbers}`` (see :func:`run`)."""
    return {name: run(name, out_dir, quick=quick, seed=seed, seeds=seeds, verbose=verbose) for name in EXPERIMENTS}


def _markdown(text: str) -> str:
    """Docstring markup as Markdown: Sphinx roles and double backticks become plain code spans."""
    text = re.sub(r":(?:class|func|data|meth|mod):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _plain(text: str) -> str:
    """Measured text as Markdown that shows it as written: ``lr*lambda ... max|w|*lambda`` is no emphasis."""
    return re.sub(r"([*_`\[\]])", r"\\\1", text)


def render_markdown(json_dir: Path, figures: str = "../figures/") -> str:
    """The experiments page as Markdown, generated from the ``<name>.json`` files in ``json_dir``.

    One section per experiment found (in :data:`EXPERIMENTS` order): its title and description, the
    figure (linked as ``figures + "<name>.png"``, relative to where the page will live), each finding
    with the number of seeds it holds on, the measured notes, and the seeds, mode, wall and CPU time.
    Nothing on the page is typed in: rerunning the experiments and this function regenerates it.
    """
    json_dir = Path(json_dir)
    lines = ["# Experiments", "",
             "Each experiment below was generated by `descend experiments all --out docs/figures` and this page by",
             "`descend.experiments.render_markdown(\"docs/figures\")`. Every claim is checked separately on each seed",
             "and says on how many it holds; figures show the mean over seeds with the min-max range shaded.",
             "Learning rates and other choices are made on validation data (or on separately drawn problems), each",
             "method tuned at every setting it is shown at; every reported loss and accuracy is on test data used for",
             "nothing else. The slow test suite reruns every experiment on seeds 100-104 and checks that each finding",
             "below holds on at least 4 of those 5 seeds.", ""]
    total = cpu_total = 0.0
    for name in EXPERIMENTS:
        path = json_dir / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        total += float(data.get("seconds", 0.0))
        cpu_total += float(data.get("cpu_seconds", 0.0))
        seeds = data.get("seeds", [])
        mode = "quick mode" if data.get("quick") else "full mode"
        lines += [f"## {name}", "", f"**{_markdown(data.get('title', ''))}**", ""]
        if data.get("description"):
            lines += [_markdown(" ".join(data["description"].split())), ""]
        lines += [f"![{name}]({figures}{name}.png)", ""]
        if data.get("findings"):
            lines += ["Findings:", ""]
            lines += [f"- {_plain(f['text'])} (**on {f['holds']} of {f['seeds']} seeds**)" for f in data["findings"]]
            lines.append("")
        if data.get("notes"):
            lines += ["Measured:", ""]
            lines += [f"- {_plain(note)}" for note in data["notes"]]
            lines.append("")
        lines += [f"*{len(seeds)} seeds ({', '.join(map(str, seeds))}), {mode}, "
                  f"{float(data.get('seconds', 0.0)):.0f} s wall time, "
                  f"{float(data.get('cpu_seconds', 0.0)):.0f} s CPU time.*", ""]
    lines += [f"Total for the experiments on this page: {total:.0f} s wall time, {cpu_total:.0f} s CPU time "
              "(one thread each).", ""]
    return "\n".join(lines)


__all__ = ["ALIASES", "EXPERIMENTS", "Finding", "Outcome", "render_markdown", "run", "run_all"]
