"""What training costs as a model grows: one step's time and memory against the parameter count, and loss
against compute for a few small language models (the compute-optimal frontier)."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from descend import optim
from descend._memory import (
    address_space_cap,
    available_memory,
    mmap_large_allocations,
    peak_resident_bytes,
    reset_peak,
)
from descend._random import generator
from descend.experiments._common import PALETTE, Outcome, band, finding, new_figure, span
from descend.nn import TransformerLM, count_parameters
from descend.train import seed_everything

#: Part 1's ladder of shapes ``(width, depth, heads)``, about 3x apart from 1M to 2B parameters.
SHAPES: tuple[tuple[int, int, int], ...] = (
    (128, 4, 4), (192, 6, 6), (320, 8, 8), (512, 8, 8), (768, 14, 12), (1024, 24, 16), (1536, 36, 24),
    (2048, 40, 32),
)
#: Part 1's optimizer configurations: label -> (preset, keyword arguments, whether the step runs in the backward).
CONFIGS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "AdamW, float32 state": ("AdamW", {}, False),
    "AdamW, bfloat16 state": ("AdamW", {"state_dtype": "bfloat16"}, False),
    "Lion": ("Lion", {}, False),
    "AdamW, step in backward": ("AdamW", {}, True),
}
#: Bytes per parameter of the float32 weights, float32 gradients (one tensor's at a time in the backward pass) and
#: optimizer state alone: what a step needs at the least, before temporaries.
HELD_BYTES = {"AdamW, float32 state": 4 + 4 + 8, "AdamW, bfloat16 state": 4 + 4 + 4, "Lion": 4 + 4 + 4,
              "AdamW, step in backward": 4 + 8}
STEP_BATCH, STEP_CONTEXT = 1, 64  # part 1's tokens per step: fixed, so the work grows with the parameters alone
DEFAULT_MAX_PARAMS = 3e7
MEMORY_CAP = 16 * 2**30  # part 1's children never address more than this (or 80% of the memory available)
#: Part 2's models ``(width, depth, heads)``, its tokens per step, and the compute each model is trained to.
LM_SHAPES: tuple[tuple[int, int, int], ...] = ((8, 1, 2), (16, 1, 2), (32, 1, 4), (48, 2, 4))
LM_BATCH, LM_CONTEXT, LM_LR, LM_EVAL_WINDOWS = 32, 32, 3e-3, 64
DEFAULT_COMPUTE = 2e10


def _shape_params(shape: tuple[int, int, int], context: int) -> int:
    """Parameters of ``TransformerLM(256, context, *shape)``, counted on the meta device (nothing allocated)."""
    width, depth, heads = shape
    with torch.device("meta"):
        return count_parameters(TransformerLM(256, context, width=width, depth=depth, heads=heads))


def _child(config: str, sizes: Sequence[int], seeds: Sequence[int], repeats: int) -> None:
    """Part 1 in a child process: for each shape index in ``sizes`` (increasing) and each seed, one warm-up
    step and ``repeats`` timed steps of ``config``; prints one JSON line per (size, seed), or one saying the
    size does not fit under the process's memory limit, then stops."""
    torch.set_num_threads(1)
    mmap_large_allocations()  # a freed model's memory leaves the resident set before the next size is measured
    preset, kwargs, in_backward = CONFIGS[config]
    kwargs = {k: getattr(torch, v) if k == "state_dtype" else v for k, v in kwargs.items()}
    for index in sizes:
        width, depth, heads = SHAPES[index]
        for seed in seeds:
            gc.collect()
            reset_peak()
            try:
                seed_everything(seed)
                model = TransformerLM(256, STEP_CONTEXT, width=width, depth=depth, heads=heads)
                opt = getattr(optim, preset)(model.parameters(), lr=1e-4, **kwargs)
                hooks = optim.step_in_backward(opt) if in_backward else None
                idx = torch.randint(256, (STEP_BATCH, STEP_CONTEXT + 1), generator=generator(seed))
                times = []
                for i in range(1 + repeats):
                    start = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    logits = model(idx[:, :-1])  # (B, T, 256)
                    F.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1)).backward()
                    if hooks is None:
                        opt.step()
                    if i:
                        times.append(time.perf_counter() - start)
                row = {"size": index, "seed": seed, "seconds": sorted(times)[len(times) // 2],
                       "peak_bytes": peak_resident_bytes(), "fits": True}
                if hooks is not None:
                    hooks.remove()
                del model, opt, hooks, logits
            except (MemoryError, RuntimeError) as e:  # torch's allocator raises RuntimeError when it cannot map
                print(json.dumps({"size": index, "seed": seed, "fits": False, "error": str(e).splitlines()[0][:200]}),
                      flush=True)
                return
            print(json.dumps(row), flush=True)


def _memory_limit() -> int:
    """The address-space limit of part 1's children: ``MEMORY_CAP`` or 80% of the memory now available."""
    return int(min(MEMORY_CAP, 0.8 * available_memory(MEMORY_CAP)))


def _step_costs(sizes: Sequence[int], seeds: Sequence[int], repeats: int, limit: int,
                configs: Sequence[str] = tuple(CONFIGS)) -> dict[str, list[dict]]:
    """Part 1: each configuration in its own child process under an address-space ``limit``; its rows."""
    out: dict[str, list[dict]] = {}
    for config in configs:
        code = (f"from descend.experiments._scale import _child; "
                f"_child({config!r}, {list(sizes)!r}, {list(seeds)!r}, {repeats})")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              preexec_fn=address_space_cap(limit), env=env)
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        measured = {(r["size"], r["seed"]) for r in rows}
        if done.returncode != 0:  # killed past the limit (an abort, not an exception): the next size does not fit
            missing = next(((i, s) for i in sizes for s in seeds if (i, s) not in measured), None)
            if missing is not None:
                err = done.stderr.strip()
                reason = err.splitlines()[-1][:200] if err else f"exit {done.returncode}"
                rows.append({"size": missing[0], "seed": missing[1], "fits": False, "error": reason})
        out[config] = rows
    return out


def _fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares line ``y = a + b x``: ``(a, b)``."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((v - mx) ** 2 for v in x)
    b = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx if sxx > 0 else math.nan
    return my - b * mx, b


def _summarise(costs: dict[str, list[dict]], params_of: Sequence[int], seeds: Sequence[int]) -> dict[str, Any]:
    """Part 1's rows as, per configuration: the parameters, seconds and peak bytes per seed, the log-log slope
    of time (sizes from 5M up, or every size when fewer than two are), the bytes per parameter (slope of
    peak memory, sizes from 3M up likewise) and the sizes that do not fit."""
    table: dict[str, dict[str, Any]] = {}
    for config, rows in costs.items():
        fits = [r for r in rows if r["fits"]]
        too_big = sorted({params_of[r["size"]] for r in rows if not r["fits"]})
        per_seed = {s: sorted((params_of[r["size"]], r["seconds"], r["peak_bytes"]) for r in fits if r["seed"] == s)
                    for s in seeds}
        slopes, bpp = [], []
        for s in seeds:
            big = [(p, t) for p, t, _ in per_seed[s] if p >= 5e6]
            big = big if len(big) >= 2 else [(p, t) for p, t, _ in per_seed[s]]  # small sweeps: every size
            slopes.append(_fit([math.log(p) for p, _ in big], [math.log(t) for _, t in big])[1]
                          if len(big) >= 2 else math.nan)
            mem = [(p, m) for p, _, m in per_seed[s] if p >= 3e6]
            mem = mem if len(mem) >= 2 else [(p, m) for p, _, m in per_seed[s]]
            bpp.append(_fit([p for p, _ in mem], [m for _, m in mem])[1] if len(mem) >= 2 else math.nan)
        table[config] = {"params": [p for p, _, _ in per_seed[seeds[0]]],
                         "seconds": {str(s): [t for _, t, _ in per_seed[s]] for s in seeds},
                         "peak_bytes": {str(s): [m for _, _, m in per_seed[s]] for s in seeds},
                         "slope": slopes, "bytes_per_parameter": bpp, "does_not_fit": too_big}
    return table


# --- part 2 ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _text(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """stdlib-text windows of ``LM_CONTEXT`` bytes split by ``seed``: train inputs/targets and a fixed set of
    ``LM_EVAL_WINDOWS`` validation windows, evenly spaced."""
    from descend.data.text import load_stdlib_text

    data = load_stdlib_text(seed, context=LM_CONTEXT, train_bytes=400_000, val_bytes=24_000, test_bytes=24_000)
    val_x, val_y = data.val.inputs[0], data.val.targets
    pick = torch.arange(LM_EVAL_WINDOWS) * len(val_x) // LM_EVAL_WINDOWS
    return data.train.inputs[0], data.train.targets, val_x[pick], val_y[pick]


def _train_lm(shape: tuple[int, int, int], seed: int, compute: float, points: int) -> dict[str, list[float]]:
    """Train ``TransformerLM(*shape)`` with AdamW until ``6 * params * tokens`` reaches ``compute``; the
    validation loss (nats per byte) at ``points`` log-spaced steps and the compute spent by each."""
    x, y, val_x, val_y = _text(seed)
    seed_everything(seed)
    width, depth, heads = shape
    model = TransformerLM(256, LM_CONTEXT, width=width, depth=depth, heads=heads)
    params = count_parameters(model)
    per_step = 6 * params * LM_BATCH * LM_CONTEXT
    steps = max(2, round(compute / per_step))
    marks = sorted({max(1, round(steps ** (i / (points - 1)))) for i in range(points)})
    opt = optim.AdamW(model.parameters(), lr=LM_LR)
    g = generator(seed)
    flops, losses = [], []
    for step in range(1, steps + 1):
        batch = torch.randint(len(x), (LM_BATCH,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[batch]).reshape(-1, 256), y[batch].reshape(-1)).backward()
        opt.step()
        if step in marks:
            with torch.no_grad():
                loss = float(F.cross_entropy(model(val_x).reshape(-1, 256), val_y.reshape(-1)))
            flops.append(step * per_step)
            losses.append(loss if math.isfinite(loss) else math.inf)
    return {"params": params, "steps": steps, "flops": flops, "val_loss": losses}


def _at(curve: dict[str, list[float]], c: float) -> float:
    """The curve's loss at compute ``c``, linear in ``log c`` between its evaluations; inf outside its range."""
    f, v = curve["flops"], curve["val_loss"]
    if not f or c < f[0] * (1 - 1e-9) or c > f[-1] * (1 + 1e-9):
        return math.inf
    for j in range(1, len(f)):
        if c <= f[j]:
            w = (math.log(c) - math.log(f[j - 1])) / (math.log(f[j]) - math.log(f[j - 1]))
            return v[j - 1] + min(max(w, 0.0), 1.0) * (v[j] - v[j - 1])
    return v[-1]


def _frontier(curves: dict[str, dict[str, list[float]]], grid: Sequence[float]) -> list[tuple[float, str]]:
    """At each compute in ``grid``: the lowest loss of any model trained with that compute, and which model."""
    return [min(((_at(curve, c), name) for name, curve in curves.items()), key=lambda t: t[0]) for c in grid]


def scale(*, quick: bool = False, seeds: Sequence[int] = (0, 1), max_params: float | None = None,
          compute: float | None = None) -> Outcome:
    """One training step costs time and memory in proportion to the parameters; at a fixed compute budget the
    best model size grows with the budget.

    Part 1: one step (forward, backward, optimizer) of a ``TransformerLM`` on ``1 x 64`` bytes (a fixed number of
    tokens per step, so the work grows with the parameters alone) at sizes about 3x apart from about 1M parameters
    up to ``max_params`` (3e7 by default; ``run("scale", out, max_params=2e9)`` for the big sweep), one thread, for
    four optimizer configurations: AdamW with float32 state, AdamW with bfloat16 state, Lion, and AdamW stepped
    inside the backward pass (``descend.optim.step_in_backward``). Time is the median of 2 timed steps after a
    warm-up one; memory is the peak resident set of the step, measured in a child process per configuration whose
    address space is capped (16 GiB, or 80% of the memory available), so a size that does not fit is reported as
    such, and whose C library returns every freed tensor to the system (so a smaller size's memory is not counted in
    the next one's peak). The slope of log time against log parameters is fitted on each seed over the sizes from 5M
    up (theory: 1, linear), and the bytes per parameter of each configuration is the slope of peak memory against
    parameters. Part 2: four small ``TransformerLM`` (3k to 70k parameters) trained with AdamW (lr 3e-3, 32 x 32
    bytes per step) on stdlib-text, each to the same training compute ``6 x parameters x tokens`` (all parameters
    counted), the validation loss (nats per byte, 64 fixed windows) at log-spaced steps; the frontier is the lowest
    loss any size reaches for a given compute.
    """
    n = len(seeds)
    max_params = DEFAULT_MAX_PARAMS if max_params is None else float(max_params)
    compute = (DEFAULT_COMPUTE / 4 if quick else DEFAULT_COMPUTE) if compute is None else float(compute)
    if max_params < 1e6:
        raise ValueError(f"max_params={max_params:g}: must be >= 1e6 (the smallest size has about 1M parameters)")
    params_of = [_shape_params(s, STEP_CONTEXT) for s in SHAPES]
    sizes = [i for i, p in enumerate(params_of) if p <= max_params * 1.05]
    limit = _memory_limit()
    costs = _step_costs(sizes, seeds, 2, limit)

    table = _summarise(costs, params_of, seeds)

    # part 2: loss against compute, each size trained to the same compute, over seeds
    points = 8 if quick else 12
    lm_names = [f"{_shape_params(s, LM_CONTEXT) / 1e3:.0f}k" for s in LM_SHAPES]
    runs = {name: [_train_lm(shape, s, compute, points) for s in seeds] for name, shape in zip(lm_names, LM_SHAPES)}
    lo = max(min(r["flops"]) for rr in runs.values() for r in rr)  # every model has been evaluated once
    hi = min(max(r["flops"]) for rr in runs.values() for r in rr)  # and none has stopped
    grid = [lo * (hi / lo) ** (i / 15) for i in range(16)]
    fronts = [_frontier({m: rr[i] for m, rr in runs.items()}, grid) for i in range(n)]
    first = lm_names[0]
    size_of = {m: runs[m][0]["params"] for m in lm_names}

    slope_ok = [all(0.6 <= table[c]["slope"][i] <= 1.3 for c in CONFIGS) for i in range(n)]
    fitted = [p for p in table["AdamW, float32 state"]["params"] if p >= 5e6]
    slopes = ", ".join(f"{c} {span(table[c]['slope'], '.2f')}" for c in CONFIGS)
    if fitted and max(fitted) >= 10 * min(fitted):  # a slope over a decade of sizes says something
        time_finding = finding("time_linear_in_parameters",
                               f"one step's time grows about linearly with the parameters from 5M up: fitted log-log "
                               f"slopes {slopes} (each within 0.6..1.3)", slope_ok)
    else:  # a few small sizes: per-step overheads and a shared machine's noise swamp the slope; only the trend
        grows_t = [all(table[c]["seconds"][str(s)][-1] > table[c]["seconds"][str(s)][0] for c in CONFIGS
                       if table[c]["params"]) for s in seeds]
        time_finding = finding("time_grows_with_parameters",
                               f"one step of the largest size takes longer than one of the smallest, for every "
                               f"configuration (log-log slopes from 5M up, over less than a decade: {slopes})", grows_t)
    full = table["AdamW, float32 state"]["bytes_per_parameter"]
    lean = table["AdamW, bfloat16 state"]["bytes_per_parameter"]
    lion = table["Lion"]["bytes_per_parameter"]
    backward = table["AdamW, step in backward"]["bytes_per_parameter"]
    grows = [fr[0][1] != fr[-1][1] and size_of[fr[-1][1]] > size_of[fr[0][1]] for fr in fronts]
    end_best = [min(lm_names, key=lambda m, i=i: runs[m][i]["val_loss"][-1]) for i in range(n)]
    start_small = [fr[0][1] == first for fr in fronts]
    biggest = max(table["AdamW, float32 state"]["params"], default=0)
    findings = [
        time_finding,
        finding("lean_state_saves_memory",
                f"AdamW with bfloat16 state and Lion (one state tensor) each take fewer bytes per parameter than "
                f"AdamW with float32 state ({span(lean, '.1f')} and {span(lion, '.1f')} against {span(full, '.1f')})",
                [a < c and b < c for a, b, c in zip(lean, lion, full)]),
        finding("step_in_backward_saves_memory",
                f"stepping inside the backward pass takes fewer bytes per parameter than the step after it "
                f"({span(backward, '.1f')} against {span(full, '.1f')})",
                [a < b for a, b in zip(backward, full)]),
        finding("optimal_size_grows_with_compute",
                f"the compute-optimal size grows with compute: the frontier starts on a smaller model than it "
                f"ends on (the {first} model at the lowest compute on {sum(start_small)} of {n} seeds; lowest "
                f"final loss: " + ", ".join(f"{m} on {end_best.count(m)}" for m in lm_names if end_best.count(m)) + ")",
                grows),
    ]
    notes = []
    for c in CONFIGS:
        row = table[c]
        if row["params"]:
            top = row["params"][-1]
            notes.append(f"{c}: at {top / 1e6:.3g}M parameters {span([row['seconds'][str(s)][-1] for s in seeds])} s "
                         f"a step, peak resident set {row['peak_bytes'][str(seeds[0])][-1] / 2**30:.2f} GiB; "
                         f"{span(row['bytes_per_parameter'], '.1f')} bytes per parameter, against "
                         f"{HELD_BYTES[c]} for the weights, gradients and state alone")
        if row["does_not_fit"]:
            notes.append(f"{c}: does not fit under {limit / 2**30:.1f} GiB at "
                         + ", ".join(f"{q / 1e6:.4g}M" for q in row["does_not_fit"]) + " parameters")
    notes += [f"part 2, {m} parameters: {runs[m][0]['steps']} steps to {compute:.2g} FLOPs, final validation loss "
              f"{span([r['val_loss'][-1] for r in runs[m]])} nats/byte "
              f"({span([r['val_loss'][-1] / math.log(2) for r in runs[m]])} bits/byte)" for m in lm_names]
    numbers: dict[str, Any] = {
        "max_params": max_params, "memory_limit_bytes": limit, "tokens_per_step": STEP_BATCH * STEP_CONTEXT,
        "threads": 1, "machine": _machine(), "largest_measured": biggest,
        "step_costs": table, "raw": costs,
        "lm": {"compute": compute, "batch": LM_BATCH, "context": LM_CONTEXT, "lr": LM_LR,
               "runs": {m: [{k: r[k] for k in ("params", "steps", "flops", "val_loss")} for r in rr]
                        for m, rr in runs.items()},
               "frontier": {"flops": grid, "per_seed": [[list(p) for p in fr] for fr in fronts]}},
    }

    fig, (ax_t, ax_m, ax_l) = new_figure(3, width=4.6, height=3.9)
    for (config, color) in zip(CONFIGS, PALETTE):
        row = table[config]
        if not row["params"]:
            continue
        band(ax_t, row["params"], [row["seconds"][str(s)] for s in seeds], color,
             f"{config} (slope {span(row['slope'], '.2f')})")
        missing = f"; not {_count(row['does_not_fit'][0])}" if row["does_not_fit"] else ""
        ax_m.plot(row["params"], [m / 2**30 for m in row["peak_bytes"][str(seeds[0])]], marker="o", markersize=3,
                  color=color, label=f"{config}: {span(row['bytes_per_parameter'], '.1f')} B/param{missing}")
        for q in row["does_not_fit"]:
            ax_m.plot([q], [limit / 2**30], marker="x", color=color, markersize=7)
    ps = sorted({p for c in CONFIGS for p in table[c]["params"]})
    if ps:
        ref = table["AdamW, float32 state"]["seconds"][str(seeds[0])]
        if ref:
            ax_t.plot(ps, [ref[-1] * p / ps[-1] for p in ps], color="#888888", linestyle=":", label="slope 1")
    ax_m.axhline(limit / 2**30, color="#888888", linestyle=":", linewidth=1)
    ax_t.set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds per step (1 x 64 bytes)",
             title="one training step, 1 thread")
    ax_m.set(xscale="log", yscale="log", xlabel="parameters", ylabel="peak resident set (GiB)",
             title=f"memory of the step (x: does not fit under {limit / 2**30:.0f} GiB)")
    for (m, color) in zip(lm_names, PALETTE):
        band(ax_l, runs[m][0]["flops"], [r["val_loss"] for r in runs[m]], color, f"{m} parameters")
    mean_front = [sum(fr[j][0] for fr in fronts) / n for j in range(len(grid))]
    ax_l.plot(grid, mean_front, color="#000000", linestyle="--", linewidth=1, label="frontier (mean over seeds)")
    ax_l.set(xscale="log", xlabel="training compute 6 x params x tokens (FLOPs)",
             ylabel="validation loss (nats per byte)", title="stdlib-text: loss against compute")
    for ax in (ax_t, ax_m, ax_l):
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=6)
    return Outcome(numbers, fig, findings, notes)


def _count(n: float) -> str:
    """``1.02B``, ``303M``: a parameter count in words."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _machine() -> str:
    """The CPU's model name and the cores this process may use."""
    name = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}"
