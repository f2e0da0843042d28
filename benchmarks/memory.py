"""Memory of a training step, by optimizer and mode: what a ``TransformerLM`` holds at its peak, and why.

    python benchmarks/memory.py                        # 10M, 100M, 1B rows -> benchmarks/results/memory.json
    python benchmarks/memory.py --sizes 10M --rows "torch AdamW,descend Lion, int8 state"
    python benchmarks/memory.py --two-billion          # the 2B-parameter run (about 20 minutes on 2 cores)
    python benchmarks/memory.py --quality              # lean modes against float32 AdamW, 3 seeds, descend train
    python benchmarks/memory.py --quick --out /tmp/m.json   # a smoke run of every part (seconds)
    python benchmarks/memory.py --device cuda --out benchmarks/results/memory_cuda.json

Each row (an optimizer in one mode, at one model size) runs in a fresh interpreter whose address space is
capped (``--cap-gib``, and never more than 80% of the memory available when it starts), one row at a time:
a model that does not fit fails inside the child instead of exhausting the machine. The child imports
everything, takes one step of a tiny model (so the libraries' own buffers are loaded), records its resident
set (the *baseline*), builds the model and optimizer, takes a warm-up step and ``--steps`` timed steps on one
batch of ``1 x 64`` bytes and records the peak resident set of those steps (``VmHWM``, with glibc serving
every allocation over 64 KiB by ``mmap``, so freed memory leaves the resident set). On CUDA the peak is
``torch.cuda.max_memory_allocated`` and the baseline is what is allocated before the model.

The peak is split into the parameters, the gradients alive at the peak (every parameter's after the
ordinary backward pass; the largest parameter's when the step runs inside the backward pass) and the
optimizer state (the bytes of every tensor the optimizer keeps, codes and scales included), each counted
from tensor sizes, and the rest: the peak minus the baseline minus those (activations, autograd's buffers,
the step's temporaries). *Training state* is the first three. Step time is the median of the timed steps;
its ratio to ``torch.optim.AdamW(fused=True)`` with float32 state at the same size comes from
:data:`REFERENCE_PAIRS` more steps of the row alternated with as many of torch's, in the row's process.

``--two-billion`` trains a ``TransformerLM`` of about 2B parameters for ``--steps`` (default 10) steps on one
repeated batch, then evaluates it on another batch, in the two lean configurations of the targets (AdamW:
float32 parameters, int8 state, step in backward; Lion: bfloat16 parameters, int8 state, step in backward);
the peak is the process's whole life (construction, training and evaluation). ``--quality`` trains the
built-in text task with ``descend train`` in each lean mode and float32 AdamW (and Lion) on 3 seeds and
compares the final validation losses. Each mode writes its own part of ``--out``, keeping the others.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from descend._io import write_json
from descend._memory import (
    address_space_cap,
    available_memory,
    mmap_large_allocations,
    peak_resident_bytes,
    reset_peak,
    resident_bytes,
)

GIB = 2**30
VOCAB, CONTEXT, BATCH = 256, 64, 1
#: name -> (width, depth, heads) of ``TransformerLM(256, 64, ...)``
SIZES: dict[str, tuple[int, int, int]] = {
    "10M": (384, 6, 6), "100M": (1024, 8, 16), "1B": (2048, 20, 16), "2B": (2048, 40, 16),
    "100k": (64, 2, 2), "1M": (128, 5, 4),  # for --quick
}
DEFAULT_SIZES = ("10M", "100M", "1B")
QUICK_SIZES = ("100k", "1M")
REFERENCE = "torch AdamW"
#: Steps of a row alternated with as many of torch's AdamW in the row's process: its step-time ratio.
REFERENCE_PAIRS = 6


@dataclass(frozen=True)
class Row:
    """One optimizer in one mode. ``library``: torch, descend, torchao or bitsandbytes; ``state``: the
    optimizer state's format; ``params``: the parameters' dtype; ``in_backward``: the step runs inside the
    backward pass (``descend.optim.step_in_backward``); ``autocast``: the forward pass in bfloat16 autocast."""

    name: str
    library: str
    optimizer: str
    state: str = "float32"
    params: str = "float32"
    in_backward: bool = False
    autocast: bool = False


def _descend_name(optimizer: str, state: str, params: str, in_backward: bool) -> str:
    parts = [f"descend {optimizer}"]
    if params != "float32":
        parts.append(f"{params} params")
    parts.append(f"{state} state")
    if in_backward:
        parts.append("step in backward")
    return ", ".join(parts)


ROWS: list[Row] = [
    Row(REFERENCE, "torch", "AdamW"),
    Row("torch AdamW, bf16 autocast", "torch", "AdamW", autocast=True),
    Row("torchao AdamW8bit", "torchao", "AdamW8bit", state="8-bit"),
    Row("torchao AdamW4bit", "torchao", "AdamW4bit", state="4-bit"),
    Row("torchao AdamWFp8", "torchao", "AdamWFp8", state="fp8"),
    Row("bitsandbytes AdamW8bit", "bitsandbytes", "AdamW8bit", state="8-bit"),
] + [
    Row(_descend_name(o, s, p, b), "descend", o, s, p, b)
    for o in ("AdamW", "Lion") for p in ("float32", "bfloat16") for b in (False, True)
    for s in ("float32", "bfloat16", "int8")
]
BY_NAME = {r.name: r for r in ROWS}
#: the two configurations the targets name, and their training-state bound (bytes per parameter)
TARGET_ADAMW = _descend_name("AdamW", "int8", "float32", True)
TARGET_LION = _descend_name("Lion", "int8", "bfloat16", True)
STATE_TARGETS = {TARGET_ADAMW: 6.0, TARGET_LION: 3.0}
#: rows measured at 1B by default: the targets' configurations and torch's float32 AdamW
ROWS_1B = (REFERENCE, _descend_name("AdamW", "bfloat16", "float32", True), TARGET_ADAMW, TARGET_LION)
TIME_TARGET, TIME_SIZE = 1.15, "100M"
#: rows of --quick: the reference, autocast, one peer and descend's float32 and lean modes
QUICK_ROWS = (REFERENCE, "torch AdamW, bf16 autocast", "bitsandbytes AdamW8bit",
              _descend_name("AdamW", "float32", "float32", False), _descend_name("AdamW", "bfloat16", "float32", True),
              TARGET_ADAMW, TARGET_LION)
#: the 2B run: the targets' configurations, their peak bound (GiB) and learning rate
TWO_B_RUNS = {TARGET_ADAMW: (14.0, 3e-4), TARGET_LION: (8.0, 1e-5),
              # the Lion configuration with bfloat16 instead of 8-bit state (--rows picks it)
              _descend_name("Lion", "bfloat16", "bfloat16", True): (8.0, 1e-5)}


# ----------------------------------------------------------------------------------------------- child


def available(row: Row) -> str | None:
    """``None`` when this build and this machine can run ``row``; else why not, in one line."""
    import torch

    try:
        if row.library == "torchao":
            import torchao.optim  # noqa: F401
        elif row.library == "bitsandbytes":
            import bitsandbytes  # noqa: F401
        elif row.library == "descend":
            import inspect

            from descend.optim import ChainOptimizer

            if row.params != "float32" and "param_rounding" not in inspect.signature(ChainOptimizer).parameters:
                return ("not available in this build: descend rounds bfloat16 parameters to nearest "
                        "(no stochastic rounding)")
            p = torch.nn.Parameter(torch.zeros(8, dtype=getattr(torch, row.params)))
            p.grad = torch.ones_like(p)
            make_optimizer(row, [p], 1e-3).step()
    except ImportError as e:
        return f"does not install here: {str(e).splitlines()[0][:160]}"
    except (TypeError, ValueError) as e:
        if row.library == "descend":
            return f"not available in this build: {str(e).splitlines()[0][:160]}"
        raise
    return None


def make_optimizer(row: Row, params: Any, lr: float) -> Any:
    import torch

    if row.library == "torch":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if row.library == "torchao":
        import torchao.optim

        return getattr(torchao.optim, row.optimizer)(params, lr=lr)
    if row.library == "bitsandbytes":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr)
    from descend import optim

    # float32 state beside bfloat16 parameters is asked for by name: None keeps the state in the parameters' dtype
    state = {"float32": None if row.params == "float32" else torch.float32,
             "bfloat16": torch.bfloat16}.get(row.state, row.state)
    return getattr(optim, row.optimizer)(params, lr=lr, state_dtype=state)


def tensor_bytes(value: Any, seen: set[int]) -> int:
    """Bytes of the tensors in ``value`` (a tensor, a tensor subclass holding others, or a container of them),
    each storage counted once."""
    import torch

    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in value)
    if not isinstance(value, torch.Tensor):
        inner = getattr(value, "__dict__", None)
        return tensor_bytes(inner, seen) if isinstance(inner, dict) else 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):  # torchao's low-bit state
        names, _ = value.__tensor_flatten__()
        return sum(tensor_bytes(getattr(value, n), seen) for n in names)
    key = value.untyped_storage().data_ptr() if value.device.type != "meta" else id(value)
    if key in seen:
        return 0
    seen.add(key)
    return value.untyped_storage().nbytes()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one row at one size (see the module docstring); the result as a dict."""
    mmap_large_allocations()
    import torch
    import torch.nn.functional as F

    from descend import optim
    from descend.nn import TransformerLM

    row, device = BY_NAME[spec["row"]], torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    reason = available(row)
    if reason is not None:
        return {"available": False, "reason": reason}
    cuda = device.type == "cuda"
    param_dtype, use_autocast = getattr(torch, row.params), row.autocast

    def batch(seed: int) -> Any:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(VOCAB, (BATCH, CONTEXT + 1), generator=g).to(device)

    def loss_of(model: Any, idx: Any, autocast: bool | None = None) -> Any:
        enabled = use_autocast if autocast is None else autocast
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            logits = model(idx[:, :-1])  # (B, T, 256)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), idx[:, 1:].reshape(-1))

    def build(width: int, depth: int, heads: int, dtype: Any = None) -> Any:
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype or param_dtype)  # built in its dtype: never a float32 copy of a bfloat16 model
        try:
            with torch.device(device):
                return TransformerLM(VOCAB, CONTEXT, width=width, depth=depth, heads=heads)
        finally:
            torch.set_default_dtype(old)

    def train_step(model: Any, opt: Any, hooks: Any, idx: Any, autocast: bool | None = None) -> tuple[float, int]:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, idx, autocast)
        loss.backward()
        grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
        if hooks is None:
            opt.step()
        return float(loss), grads

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # the baseline: the libraries loaded and one step of a tiny model taken, nothing of the measured model yet
    tiny = build(32, 1, 2)
    tiny_opt = make_optimizer(row, tiny.parameters(), 1e-3)
    train_step(tiny, tiny_opt, None, batch(0))
    del tiny, tiny_opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = resident_bytes()

    width, depth, heads = SIZES[spec["size"]]
    start = time.perf_counter()
    try:
        model = build(width, depth, heads)
        opt = make_optimizer(row, model.parameters(), spec["lr"])
        hooks = optim.step_in_backward(opt) if row.in_backward else None
        idx = batch(1)
        times, losses, grads, first_peak = [], [], 0, 0
        for i in range(1 + spec["steps"]):
            if i == 1:  # the peak of the timed steps: the state exists, the first step's one-off work is over
                first_peak = torch.cuda.max_memory_allocated(device) if cuda else peak_resident_bytes()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                else:
                    reset_peak()
            sync()
            t0 = time.perf_counter()
            loss, g = train_step(model, opt, hooks, idx)
            sync()
            losses.append(loss)
            grads = max(grads, g)
            if i:
                times.append(time.perf_counter() - t0)
            elif time.perf_counter() - t0 > spec.get("first_step_budget", math.inf):
                times.append(time.perf_counter() - t0)  # too slow to time more: the first step stands for all
                break
        eval_loss = None
        if spec.get("evaluate"):
            with torch.no_grad():
                eval_loss = float(loss_of(model, batch(2)))
        sync()
        peak = torch.cuda.max_memory_allocated(device) if cuda else peak_resident_bytes()
    except (MemoryError, RuntimeError) as e:  # torch's allocator raises RuntimeError past the address-space cap
        return {"available": True, "fits": False, "error": str(e).splitlines()[0][:200]}
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    param_bytes = sum(p.untyped_storage().nbytes() for p in params)
    if row.in_backward:  # one gradient at a time: the largest parameter's
        grads = max(p.numel() * p.element_size() for p in params)
    state_bytes = tensor_bytes(list(opt.state.values()), set())
    rest = peak - baseline - param_bytes - grads - state_bytes
    held = param_bytes + grads + state_bytes
    out = {
        "available": True, "fits": True, "parameters": n, "baseline_bytes": baseline, "peak_bytes": peak,
        "first_step_peak_bytes": first_peak, "parameter_bytes": param_bytes, "gradient_bytes": grads,
        "state_bytes": state_bytes, "rest_bytes": rest, "state_bytes_per_parameter": held / n,
        "peak_bytes_per_parameter": (peak - baseline) / n, "step_seconds": statistics.median(times),
        "losses": losses, "wall_seconds": time.perf_counter() - start, "timed_steps": len(losses) - 1,
    }
    if eval_loss is not None:
        out["eval_loss"] = eval_loss
        out["run_peak_bytes"] = max(peak, first_peak)
    out["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if spec.get("reference") and row.name != REFERENCE and out["timed_steps"]:
        # torch's float32 AdamW on a float32 model of the same shape in the same process, its steps alternated
        # with the row's (row, torch, row, torch, ...), so that a shared machine's load, which changes from one
        # second to the next, falls on both alike; where both do not fit, the ratio is against the size's
        # reference row
        try:
            ref_model = build(width, depth, heads, torch.float32)
            ref = torch.optim.AdamW(ref_model.parameters(), lr=spec["lr"], fused=True)
            train_step(ref_model, ref, None, idx, autocast=False)  # its first step: the state is created
            paired: list[float] = []
            ref_times: list[float] = []
            steps = ((paired, lambda: train_step(model, opt, hooks, idx)),
                     (ref_times, lambda: train_step(ref_model, ref, None, idx, autocast=False)))
            for _ in range(REFERENCE_PAIRS):
                for times_of, step in steps:
                    sync()
                    t0 = time.perf_counter()
                    step()
                    sync()
                    times_of.append(time.perf_counter() - t0)
            out["paired_step_seconds"] = statistics.median(paired)
            out["reference_step_seconds"] = statistics.median(ref_times)
        except (MemoryError, RuntimeError):
            pass
    if hooks is not None:
        hooks.remove()
    return out


# ---------------------------------------------------------------------------------------------- parent


def memory_limit(cap_gib: float) -> int:
    """The children's address-space limit: ``cap_gib`` or 80% of the memory available now, the smaller."""
    return int(min(cap_gib * GIB, 0.8 * available_memory(int(cap_gib * GIB))))


def run_child(spec: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """One row at one size in a fresh interpreter under the address-space ``limit`` (None: uncapped)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, preexec_fn=None if limit is None else address_space_cap(limit))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    err = done.stderr.strip().splitlines()
    reason = err[-1][:200] if err else f"exit {done.returncode}"
    return {"available": True, "fits": False, "error": f"the child died ({reason})"}


def machine(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["device_name"] = torch.cuda.get_device_name(0)
    try:
        out["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return out


def parameter_count(size: str) -> int:
    import torch

    from descend.nn import TransformerLM, count_parameters

    width, depth, heads = SIZES[size]
    with torch.device("meta"):
        return count_parameters(TransformerLM(VOCAB, CONTEXT, width=width, depth=depth, heads=heads))


def table(args: argparse.Namespace, limit: int | None, previous: list[dict[str, Any]]) -> dict[str, Any]:
    """The memory table: every requested row at every requested size, one child at a time, each size's
    reference (torch's float32 AdamW) first; merged into the ``previous`` rows (a row measured again
    replaces its old record, with its own reference's ratio)."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    rows = args.rows or (QUICK_ROWS if args.quick else [r.name for r in ROWS])
    fresh: list[dict[str, Any]] = []
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    for size in sizes:
        names = [n for n in rows if n in ROWS_1B] if size == "1B" and not args.rows else rows
        if not args.rows:  # the reference first: every row's ratio where its own process could not time it
            names = [REFERENCE] + [n for n in names if n != REFERENCE]
        for name in names:
            row = BY_NAME[name]
            reason = available(row) if row.library == "descend" else None  # a peer's import is the child's
            if reason is not None:
                result: dict[str, Any] = {"available": False, "reason": reason}
            else:
                spec = {"row": name, "size": size, "steps": args.steps, "threads": args.threads,
                        "device": args.device, "lr": 1e-4, "first_step_budget": args.first_step_budget,
                        "reference": True}
                result = run_child(spec, limit)
            record = {"row": name, "size": size, "parameters": parameter_count(size), **asdict(row),
                      "address_space_cap_bytes": limit, "run": run, **result}
            record.pop("name")
            fresh.append(record)
            print(describe(record), flush=True)
    out = merge_rows(previous, fresh)
    # where torch's AdamW does not fit, its bytes per parameter at the largest size it fitted, extrapolated
    fitted = [r for r in out if r["row"] == REFERENCE and r.get("fits")]
    for r in out:
        if r["row"] == REFERENCE and not r.get("fits") and fitted:
            src = max(fitted, key=lambda f: f["parameters"])
            peak = src["baseline_bytes"] + src["peak_bytes_per_parameter"] * r["parameters"]
            r["extrapolated"] = {"from_size": src["size"], "peak_bytes": peak,
                                 "state_bytes_per_parameter": src["state_bytes_per_parameter"],
                                 "peak_bytes_per_parameter": src["peak_bytes_per_parameter"]}
    return {"rows": out, "steps": args.steps, "threads": args.threads, "batch": BATCH, "context": CONTEXT,
            "shapes": {s: SIZES[s] for s in {r["size"] for r in out}}, "memory_limit_bytes": limit,
            "targets": targets(out)}


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows with those of ``new`` in their place (same row and size), in the order of sizes and rows,
    each row's step time as a multiple of torch's float32 AdamW's: timed in the row's own process where it
    was (``reference_step_seconds``), else the size's ``torch AdamW`` row if the same run measured both."""
    done = {(r["row"], r["size"]) for r in new}
    order = {(r.name, s): (i, j) for j, r in enumerate(ROWS) for i, s in enumerate(SIZES)}
    rows = sorted([r for r in old if (r["row"], r["size"]) not in done] + new,
                  key=lambda r: order[r["row"], r["size"]])
    ref = {r["size"]: r for r in rows if r["row"] == REFERENCE and r.get("fits")}
    for r in rows:
        base = ref.get(r["size"])
        if "run" not in r and base is not None and "run" not in base:
            continue  # both measured before rows named their run, in one run: the ratio that run computed stands
        r.pop("vs_torch_adamw", None)
        r.pop("ratio_note", None)
        if not r.get("fits"):
            continue
        if r.get("reference_step_seconds"):  # alternated with the row's own steps, or (older runs) after them
            r["vs_torch_adamw"] = r.get("paired_step_seconds", r["step_seconds"]) / r["reference_step_seconds"]
        elif base and base.get("run") is not None and base.get("run") == r.get("run"):
            r["vs_torch_adamw"] = r["step_seconds"] / base["step_seconds"]
        else:
            r["ratio_note"] = "timed in another run than the size's torch AdamW row: no ratio"
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, measured: training state per parameter of the two lean configurations (at every
    size measured) and step time of every lean descend mode against torch's float32 AdamW at ``TIME_SIZE``."""
    out = []
    for r in rows:
        if r["row"] in STATE_TARGETS:
            limit = STATE_TARGETS[r["row"]]
            value = r.get("state_bytes_per_parameter")
            out.append({"target": "training state, bytes/param", "row": r["row"], "size": r["size"],
                        "value": value, "limit": limit, "met": value is not None and value <= limit,
                        **({} if r.get("fits") else {"why": r.get("reason") or r.get("error")})})
    for r in rows:
        lean = r["library"] == "descend" and (r["state"] != "float32" or r["params"] != "float32" or r["in_backward"])
        if r["size"] == TIME_SIZE and lean:
            value = r.get("vs_torch_adamw")
            why = r.get("reason") or r.get("error") or r.get("ratio_note")
            out.append({"target": "step time vs torch AdamW", "row": r["row"], "size": r["size"], "value": value,
                        "limit": TIME_TARGET, "met": value is not None and value <= TIME_TARGET,
                        **({"why": why} if why else {})})
    return out


def describe(r: dict[str, Any]) -> str:
    head = f"{r['size']:>5} {r['row']:<58}"
    if not r.get("available", True):
        return f"{head} {r['reason']}"
    if not r.get("fits"):
        return f"{head} does not fit: {r.get('error')}"
    return (f"{head} peak {r['peak_bytes'] / GIB:6.2f} GiB  params {r['parameter_bytes'] / GIB:5.2f}  grads "
            f"{r['gradient_bytes'] / GIB:5.2f}  state {r['state_bytes'] / GIB:5.2f}  rest {r['rest_bytes'] / GIB:5.2f}"
            f"  state {r['state_bytes_per_parameter']:5.2f} B/param  peak {r['peak_bytes_per_parameter']:5.2f} B/param"
            f"  {r['step_seconds']:.3f} s/step")


def print_targets(found: list[dict[str, Any]]) -> None:
    print("\ntargets (measured vs target):")
    for t in found:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        why = f"  ({t['why']})" if t.get("why") else ""
        print(f"  {t['target']:<28} {t['size']:>5} {t['row']:<58} {value:>6} <= {t['limit']:g}: "
              f"{'met' if t['met'] else 'NOT met'}{why}")


def two_billion(args: argparse.Namespace) -> dict[str, Any]:
    """The 2B run: each target configuration in a capped child, ``args.steps`` steps on a repeated batch."""
    size = "1M" if args.quick else "2B"
    names = args.rows or [TARGET_ADAMW, TARGET_LION]
    unknown = [n for n in names if n not in TWO_B_RUNS]
    if unknown:
        raise SystemExit(f"--two-billion runs {'; '.join(TWO_B_RUNS)}; not {unknown[0]!r}")
    previous = {r["row"]: r for r in args.previous_two_billion.get("runs", [])}
    runs = []
    for name in names:
        bound_gib, lr = TWO_B_RUNS[name]
        cap = memory_limit(bound_gib + 2.0)  # room for the address space torch maps and never touches
        spec = {"row": name, "size": size, "steps": args.steps, "threads": args.threads, "device": args.device,
                "lr": lr, "evaluate": True}
        t0 = time.perf_counter()
        result = run_child(spec, None if args.device.startswith("cuda") else cap)
        record = {"row": name, "size": size, "parameters": parameter_count(size), "lr": lr, "steps": args.steps,
                  "target": name in STATE_TARGETS,
                  "peak_bound_bytes": int(bound_gib * GIB), "address_space_cap_bytes": cap,
                  "process_wall_seconds": time.perf_counter() - t0, **result}
        if result.get("fits"):
            losses = result["losses"]
            record["loss_went_down"] = losses[-1] < losses[0]
            record["met"] = result["run_peak_bytes"] <= bound_gib * GIB and losses[-1] < losses[0]
            print(f"{size} {name}: {record['parameters']:,} parameters, "
                  f"run peak {result['run_peak_bytes'] / GIB:.2f} GiB"
                  f" (bound {bound_gib:g} GiB), loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                  f"{result['step_seconds']:.1f} s/step, {record['process_wall_seconds']:.0f} s in all", flush=True)
        else:
            print(f"{size} {name}: {result.get('reason') or result.get('error')}", flush=True)
        runs.append(record)
        previous.pop(name, None)
    runs += [r for r in previous.values() if r["size"] == size]  # runs of other configurations, kept
    out: dict[str, Any] = {"size": size, "shape": SIZES[size], "runs": runs, "batch": BATCH, "context": CONTEXT,
                           "threads": args.threads}
    return out


def extrapolate_torch(result: dict[str, Any], device: str) -> None:
    """torch's float32 AdamW at the 2B run's size, from its peak bytes per parameter at the largest size of
    the table where it fitted: ``result["two_billion"]["torch_adamw"]`` (nothing if it never fitted)."""
    fitted = [r for r in result["table"]["rows"] if r["row"] == REFERENCE and r.get("fits")]
    if not fitted:
        return
    src = max(fitted, key=lambda r: r["parameters"])
    tb = result["two_billion"]
    n = parameter_count(tb["size"])
    peak = src["baseline_bytes"] + src["peak_bytes_per_parameter"] * n
    memory = machine(device).get("memory_bytes")
    tb["torch_adamw"] = {"from_size": src["size"], "parameters": n,
                         "peak_bytes_per_parameter": src["peak_bytes_per_parameter"], "predicted_peak_bytes": peak,
                         "machine_memory_bytes": memory, "fits": memory is not None and peak < memory}


# --------------------------------------------------------------------------------------------- quality

#: name -> (the float32 mode it is compared with, the row of ROWS it trains with)
QUALITY_MODES: dict[str, tuple[str, str]] = {
    "AdamW float32": ("AdamW float32", _descend_name("AdamW", "float32", "float32", False)),
    "AdamW bfloat16 state": ("AdamW float32", _descend_name("AdamW", "bfloat16", "float32", False)),
    "AdamW int8 state": ("AdamW float32", _descend_name("AdamW", "int8", "float32", False)),
    "AdamW int8 state, step in backward": ("AdamW float32", TARGET_ADAMW),
    "AdamW bfloat16 params, int8 state, step in backward": (
        "AdamW float32", _descend_name("AdamW", "int8", "bfloat16", True)),
    "Lion float32": ("Lion float32", _descend_name("Lion", "float32", "float32", False)),
    "Lion int8 state": ("Lion float32", _descend_name("Lion", "int8", "float32", False)),
    "Lion bfloat16 params, int8 state, step in backward": ("Lion float32", TARGET_LION),
}


def train_text(row: Row, seed: int, shape: tuple[int, ...], threads: int) -> float:
    """Train a ``TransformerLM`` on stdlib-text (the split of seed 0; ``seed`` draws the initial weights and
    the batches) with ``row``'s optimizer and mode at descend's default learning rate; the final validation
    loss (nats per byte) on 256 validation windows spread evenly over the split."""
    import torch
    import torch.nn.functional as F

    from descend import optim
    from descend._options import DEFAULT_LR
    from descend.data.text import load_stdlib_text
    from descend.nn import TransformerLM
    from descend.train import seed_everything

    torch.set_num_threads(threads)
    width, depth, heads, context, batch, steps = shape
    data = load_stdlib_text(0, context=context, train_bytes=400_000, val_bytes=24_000, test_bytes=24_000)
    x, y = data.train.inputs[0], data.train.targets
    pick = torch.arange(256) * len(data.val.targets) // 256
    val_x, val_y = data.val.inputs[0][pick], data.val.targets[pick]
    seed_everything(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, row.params))
    try:
        model = TransformerLM(VOCAB, context, width=width, depth=depth, heads=heads)
    finally:
        torch.set_default_dtype(old)
    opt = make_optimizer(row, model.parameters(), DEFAULT_LR[row.optimizer.lower()])
    hooks = optim.step_in_backward(opt) if row.in_backward else None
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(x), (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[rows]).float().reshape(-1, VOCAB), y[rows].reshape(-1)).backward()
        if hooks is None:
            opt.step()
    if hooks is not None:
        hooks.remove()
    with torch.no_grad():
        return float(F.cross_entropy(model(val_x).float().reshape(-1, VOCAB), val_y.reshape(-1)))


def quality(args: argparse.Namespace, previous: dict[str, Any],
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Each mode of :data:`QUALITY_MODES` (or ``args.quality_modes``) trained on stdlib-text on every seed
    (:func:`train_text`); the final validation loss of each, and whether each lean mode lands within 1% of
    its float32 mode's mean or inside its range over the seeds. Modes not run again keep their ``previous``
    results when those were run with the same shape and seeds; ``progress`` is handed the results after each
    mode, so a run stopped part way keeps the modes it finished (``--quality-modes`` runs the others)."""
    shape = (32, 1, 2, 16, 8, 20) if args.quick else tuple(args.quality_shape)
    seeds = list(range(args.seeds))
    same = tuple(previous.get("shape", ())) == shape and previous.get("seeds") == seeds
    results: dict[str, Any] = dict(previous.get("modes", {})) if same else {}
    import torch

    from descend.nn import TransformerLM, count_parameters

    width, depth, heads, context, batch, steps = shape
    with torch.device("meta"):
        params = count_parameters(TransformerLM(VOCAB, context, width=width, depth=depth, heads=heads))

    def summary() -> dict[str, Any]:
        for mode, (base, _) in QUALITY_MODES.items():
            r, b = results.get(mode, {}), results.get(base, {})
            if mode == base or "val_loss" not in r or "val_loss" not in b:
                continue
            mean = statistics.mean(b["val_loss"])
            r["against"] = base
            r["relative_to_mean"] = [v / mean - 1 for v in r["val_loss"]]
            r["within_1pct"] = [abs(v / mean - 1) <= 0.01 for v in r["val_loss"]]
            r["inside_range"] = [min(b["val_loss"]) <= v <= max(b["val_loss"]) for v in r["val_loss"]]
            r["met"] = [w or i for w, i in zip(r["within_1pct"], r["inside_range"])]
        return {"parameters": params, "seeds": seeds, "shape": list(shape), "width": width, "depth": depth,
                "heads": heads, "context": context, "batch": batch, "steps": steps, "threads": args.threads,
                "modes": results}

    for mode, (_, name) in QUALITY_MODES.items():
        if args.quality_modes and mode not in args.quality_modes and mode in results:
            continue
        row = BY_NAME[name]
        reason = available(row)
        if reason is None:
            started = time.perf_counter()
            results[mode] = {"row": name, "val_loss": [train_text(row, s, shape, args.threads) for s in seeds],
                             "seconds": time.perf_counter() - started}
        else:
            results[mode] = {"row": name, "reason": reason}
        print(f"quality {mode}: {reason or ', '.join(f'{v:.4f}' for v in results[mode]['val_loss'])}", flush=True)
        if progress is not None:
            progress(summary())
    return summary()


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: s.split(","), default=None,
                        help=f"model sizes, comma-separated, of {', '.join(SIZES)} (default {','.join(DEFAULT_SIZES)})")
    parser.add_argument("--rows", type=lambda s: [x.strip() for x in s.split(";")], default=None,
                        help="rows by name, separated by ';' (default: every row; at 1B the targets' and torch's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after a warm-up one (default 3; 10 "
                        "with --two-billion)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cap-gib", type=float, default=12.0, help="address-space cap of every child (GiB)")
    parser.add_argument("--first-step-budget", type=float, default=math.inf, help="seconds: a row whose first "
                        "step takes longer is measured on that step alone (its peak includes construction)")
    parser.add_argument("--quick", action="store_true", help="small sizes and models: a smoke run of seconds")
    parser.add_argument("--table", action="store_true", help="measure the memory table (the default part)")
    parser.add_argument("--two-billion", action="store_true", help="the 2B-parameter run of the two lean "
                        "configurations")
    parser.add_argument("--quality", action="store_true", help="the quality check: each lean mode trained on "
                        "stdlib-text against float32")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quality-shape", type=lambda s: tuple(int(x) for x in s.split(",")),
                        default=(384, 6, 6, 64, 8, 250),
                        help="width,depth,heads,context,batch,steps of the quality runs")
    parser.add_argument("--quality-modes", type=lambda s: [x.strip() for x in s.split(";")], default=None,
                        help="run only these quality modes again (';'-separated), keeping the others' results")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "memory.json"))
    parser.add_argument("--merge", nargs="*", default=[], help="result files of other runs whose parts (table "
                        "rows, 2B run, quality) are merged into --out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return {}
    unknown = [n for n in args.rows or [] if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r}; rows: {'; '.join(BY_NAME)}")
    bad = [s for s in args.sizes or [] if s not in SIZES]
    if bad:
        parser.error(f"unknown size {bad[0]!r}; sizes: {', '.join(SIZES)}")
    if args.steps is None:
        args.steps = 10 if args.two_billion and not args.quick else (2 if args.quick else 3)
    parts = {"table": args.table, "two_billion": args.two_billion, "quality": args.quality}
    if not any(parts.values()) and not args.merge:
        parts = {"table": True, "two_billion": args.quick, "quality": args.quick}
    out_path = Path(args.out)
    result: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}

    def save(part: str) -> None:
        """Write ``result[part]`` into ``--out``, keeping the other parts as the file holds them now (another
        part may have been written meanwhile)."""
        held = json.loads(out_path.read_text()) if out_path.is_file() else {}
        value = result[part]
        if part == "table" and "table" in held:  # rows measured meanwhile by another run are kept
            value = {**value, "rows": merge_rows(held["table"]["rows"], value["rows"])}
            value["targets"] = targets(value["rows"])
            value["shapes"] = {r["size"]: SIZES[r["size"]] for r in value["rows"]}
        merged = {**held, "machine": machine(args.device), part: value}
        if "table" in merged and "two_billion" in merged:
            extrapolate_torch(merged, args.device)
        write_json(out_path, merged)

    if args.merge:
        for other in map(Path, args.merge):
            theirs = json.loads(other.read_text())
            for part in ("table", "two_billion", "quality"):
                if part in theirs:
                    result[part] = theirs[part]
                    save(part)
        return result
    limit = None if args.device.startswith("cuda") else memory_limit(args.cap_gib)
    if parts["table"]:
        started = time.time()
        previous = result.get("table", {}).get("rows", []) if not args.quick else []
        result["table"] = table(args, limit, previous)
        result["table"]["wall_seconds"] = time.time() - started
        print_targets(result["table"]["targets"])
        save("table")
    if parts["two_billion"]:
        args.previous_two_billion = {} if args.quick else result.get("two_billion", {})
        result["two_billion"] = two_billion(args)
        save("two_billion")
    if parts["quality"]:

        def progress(part: dict[str, Any]) -> None:
            result["quality"] = part
            save("quality")

        result["quality"] = quality(args, {} if args.quick else result.get("quality", {}), progress)
        save("quality")
    return result


if __name__ == "__main__":
    main()
