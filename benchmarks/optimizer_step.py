"""Optimizer step time at the memory-bandwidth limit: descend's default against torch.optim and peers.

Run (2 threads, 20M float32 parameters in 100 tensors; then 1M, and 100 tensors of 64 elements)::

    python benchmarks/optimizer_step.py --out benchmarks/results/optimizer_step_20M.json
    python benchmarks/optimizer_step.py --params 1M --out benchmarks/results/optimizer_step_1M.json
    python benchmarks/optimizer_step.py --params 6400 --equal-sizes --out benchmarks/results/optimizer_step_tiny.json
    python benchmarks/optimizer_step.py --device cuda --out benchmarks/results/optimizer_step_20M_cuda.json

Rows tagged ``[default]`` are descend optimizers constructed with no ``engine`` or ``flat`` argument
(``[default, flat]``: ``flat=True`` only); ``--engines`` adds rows for named engines. Every optimizer
steps the same parameters with fixed gradients; the table reports the median step time over the
timed steps of every round (after warm-up, which includes any compilation). Each round builds every
optimizer anew, in a rotated order, so where its state lands in memory averages out; within a round
the optimizers take their steps round-robin, so load from other processes hits all alike. Also: the
effective bandwidth under a stated byte model
(bytes read + written per parameter, float32: parameter r/w 8, gradient read 4, each state tensor
r/w 8, or 4 in bfloat16), its share of the copy bandwidth measured in the same run (``dst.copy_(src)``
over the same number of elements: device-to-device on CUDA), and ratios to peers measured in the
same run: ``torch.optim.AdamW(fused=True)``, ``torch.optim.SGD(momentum=0.9, fused=True)``, torch's
default AdamW (no flags) and lion-pytorch. The first two steps of the default and compiled rows (state
creation, then the first step on the engine's kernel, compiling if it compiles) are timed in fresh processes,
with an empty inductor cache (cold) and then with the cache the first left (warm).
Memory: optimizer state bytes per parameter, and the transient memory a step allocates on top.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from descend import optim
from descend._io import write_json
from descend._memory import mmap_large_allocations

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def parse_count(text: str) -> int:
    """``"20M"`` -> 20_000_000 (suffixes K, M, G)."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_params(n: int, tensors: int, device: torch.device, seed: int = 0,
                equal: bool = False) -> list[torch.nn.Parameter]:
    """``tensors`` parameters (sizes varying by up to +-50% around the mean, or ``equal``) holding ``n`` values."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.ones(tensors) if equal else 0.5 + torch.rand(tensors, generator=gen)
    sizes = (weights / weights.sum() * n).long()
    sizes[-1] += n - int(sizes.sum())
    params = []
    for size in sizes.tolist():
        p = torch.nn.Parameter(torch.randn(size, device=device) * 0.02)
        p.grad = torch.randn(size, device=device) * 1e-3
        params.append(p)
    return params


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def transient_bytes(opt: torch.optim.Optimizer, device: torch.device) -> float | None:
    """Peak bytes allocated during one step beyond what was resident before it (None if unmeasurable).

    CUDA: ``max_memory_allocated``. CPU (Linux): the process's peak resident set (``VmHWM``, reset by
    writing 5 to ``/proc/self/clear_refs``) minus the resident set before the step.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        opt.step()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        opt.step()
        return 1024.0 * max(0, _status_kib("VmHWM") - base)
    except (OSError, KeyError):
        return None


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1 and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


def candidates(engines: list[str], layouts: list[str]) -> list[tuple[str, str, Factory, int, bool]]:
    """(name, peer family, factory, bytes moved per parameter, flat) of everything this machine can run.

    ``engines``: ``"default"`` (no engine argument) and/or engine names. ``flat`` rows are descend
    optimizers with ``flat=True``: each gets its own copy of the parameters (the optimizer moves them
    into one buffer), the others share one set.
    """
    out: list[tuple[str, str, Factory, int, bool]] = []
    for engine in engines:
        for layout in layouts:
            flat = layout in ("flat", "flat-new-grads")
            if flat and engine == "reference":  # the reference engine steps one tensor at a time anyway
                continue
            tag = {"tensors": engine, "flat": f"{engine}, flat", "flat-new-grads": f"{engine}, flat, new grads"}[layout]
            for label, make, nbytes, fast_only in DESCEND:
                if fast_only and engine == "reference":
                    continue
                kw: dict[str, Any] = {} if engine == "default" else {"engine": engine}
                if flat:
                    kw["flat"] = True
                out.append((f"descend {label} [{tag}]", "descend", lambda p, m=make, k=kw: m(p, **k), nbytes, flat))
    for impl, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        out += [
            (f"torch SGD-momentum [{impl}]", "torch",
             lambda p, k=kw: torch.optim.SGD(p, lr=1e-3, momentum=0.9, **k), 20, False),
            (f"torch AdamW [{impl}]", "torch",
             lambda p, k=kw: torch.optim.AdamW(p, lr=1e-3, weight_decay=WD, **k), 28, False),
        ]
    with contextlib.suppress(ImportError):
        import lion_pytorch

        out.append(("lion-pytorch Lion", "lion-pytorch",
                    lambda p: lion_pytorch.Lion(p, lr=1e-4, weight_decay=WD, decoupled_weight_decay=False), 20,
                    False))
    with contextlib.suppress(Exception):
        import heavyball

        out.append(("heavyball AdamW", "heavyball", lambda p: heavyball.AdamW(p, lr=1e-3, weight_decay=WD), 28,
                    False))
    return out


WD = 0.01
#: descend's rows: (label, factory, bytes moved per parameter, only on the multi-tensor engines)
DESCEND: list[tuple[str, Callable[..., torch.optim.Optimizer], int, bool]] = [
    ("SGD-momentum", lambda p, **k: optim.SGD(p, lr=1e-3, momentum=0.9, **k), 20, False),
    ("AdamW", lambda p, **k: optim.AdamW(p, lr=1e-3, weight_decay=WD, **k), 28, False),
    ("Lion", lambda p, **k: optim.Lion(p, lr=1e-4, weight_decay=WD, **k), 20, False),
    ("Signum", lambda p, **k: optim.Signum(p, lr=1e-4, weight_decay=WD, **k), 20, False),
    ("chain ema->softsign->decay", lambda p, **k: optim.chain(p, optim.ema(0.9), optim.softsign(1e-8),
                                                              optim.decoupled_decay(WD), lr=1e-4, **k), 20, False),
    ("Lion bf16 state", lambda p, **k: optim.Lion(p, lr=1e-4, weight_decay=WD, state_dtype=torch.bfloat16, **k),
     16, True),
]


def first_steps(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of the first two ``step()`` calls of row ``name`` in a fresh process: cold, then warm cache."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "DESCEND_CACHE_DIR": cache}
        for kind in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--params", args.params, "--tensors", str(args.tensors), "--threads",
                   str(args.threads), "--device", args.device, "--first-steps-of", name]
            if args.equal_sizes:
                cmd.append("--equal-sizes")
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                print(f"first steps of {name} failed: {done.stderr[-500:]}", file=sys.stderr)
                return out
            out[kind] = float(done.stdout.strip().splitlines()[-1])
    return out


def time_first_steps(name: str, args: argparse.Namespace) -> float:
    """In this (fresh) process: seconds of the first two steps of row ``name``."""
    device = torch.device(args.device)
    params = make_params(parse_count(args.params), args.tensors, device, equal=args.equal_sizes)
    rows = candidates(["default", "reference", "foreach", "compiled", "native"], ["tensors", "flat"])
    factory = next(f for n, _, f, _, _ in rows if n == name)
    opt = factory(params)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(2):
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def _restore(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    for p, g in zip(params, grads):  # some peers (heavyball) consume .grad: every step sees the same gradients
        p.grad = g
    return params


def build_runs(chosen: list[tuple[str, str, Factory, int, bool]], params: list[torch.nn.Parameter],
               grads: list[torch.Tensor], args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Build and warm up (compiling, where an engine compiles) each chosen optimizer; skip what cannot run here."""
    runs: list[dict[str, Any]] = []
    for name, family, factory, nbytes, flat in chosen:
        t0 = time.perf_counter()
        own = [torch.nn.Parameter(p.detach().clone()) for p in params] if flat else params
        own_grads = [g.clone() for g in grads] if flat else grads
        try:
            opt = factory(_restore(own, own_grads))
            before = own[0].detach().clone()
            for _ in range(args.warmup):
                if not flat:  # a flat optimizer's gradients are views of its buffer, left as they are
                    _restore(own, own_grads)
                opt.step()
            sync(device)
            if torch.equal(before, own[0].detach()):
                raise RuntimeError("the optimizer did not change the weights during warm-up")
        except Exception as err:  # a peer that cannot run here (no compiler, no Triton, ...)
            print(f"skipped {name}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        new_grads = (own, own_grads) if "new grads" in name else None
        del own_grads
        warm = time.perf_counter() - t0
        print(f"  ready: {name} (warm-up {warm:.1f} s)", file=sys.stderr, flush=True)
        runs.append({"name": name, "family": family, "bytes_per_param": nbytes, "opt": opt,
                     "warmup_s": warm, "flat": flat, "new_grads": new_grads})
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--params", default="20M", help="total parameter count, e.g. 1M, 20M, 100M")
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per optimizer and round (the median "
                        "over all rounds is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="times every optimizer is built anew (fresh state "
                        "memory, rotated build order); each round times --steps steps of each")
    parser.add_argument("--engines", default="default", help="descend rows: 'default' (no engine argument) "
                        "and/or engine names, e.g. default,foreach,compiled")
    parser.add_argument("--layouts", default="tensors,flat", help="descend's parameter layouts: 'tensors' "
                        "(the model's own tensors), 'flat' (flat=True: one buffer per group) and/or "
                        "'flat-new-grads' (flat=True with a new .grad tensor each step, as backward makes after "
                        "torch's zero_grad(set_to_none=True): the step copies it into the buffer)")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching rows "
                        "(the peers of the ratios always run)")
    parser.add_argument("--equal-sizes", action="store_true", help="tensors of equal size (default: +-50%%)")
    parser.add_argument("--first-steps", default="auto", choices=["auto", "yes", "no"],
                        help="time the first steps of the default and compiled rows in fresh processes "
                        "(auto: at 1M parameters or more)")
    parser.add_argument("--first-steps-of", default="", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="1M parameters, 5 steps: a smoke run")
    parser.add_argument("--out", default="benchmarks/optimizer_step.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.params, args.steps, args.warmup, args.first_steps, args.rounds = "1M", 5, 1, "no", 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.first_steps_of:
        print(time_first_steps(args.first_steps_of, args))
        return {}
    mmap_large_allocations()
    device = torch.device(args.device)
    n = parse_count(args.params)
    load_before = os.getloadavg()
    params = make_params(n, args.tensors, device, equal=args.equal_sizes)
    grads = [p.grad for p in params]
    only = [s for s in args.only.split(",") if s]
    chosen = [c for c in candidates(args.engines.split(","), args.layouts.split(","))
              if not only or c[0] in PEERS.values() or any(s in c[0] for s in only)]
    buf = [torch.empty(n, device=device).uniform_() for _ in range(3)]
    stream_ops = {"copy": (lambda: buf[0].copy_(buf[1]), 8),  # device-to-device on CUDA
                  "triad": (lambda: torch.add(buf[1], buf[2], alpha=0.5, out=buf[0]), 12)}
    stream_times: dict[str, list[float]] = {k: [] for k in stream_ops}
    times: dict[str, list[float]] = {}
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        # Each round builds every optimizer anew (fresh state memory) in a rotated order, so where in memory
        # an optimizer's state lands, and who was built first, average out over the rounds.
        shift = round_ * len(chosen) // max(1, args.rounds)
        runs.clear()
        gc.collect()
        runs += build_runs(chosen[shift:] + chosen[:shift], params, grads, args, device)
        runs.sort(key=lambda r: [c[0] for c in chosen].index(r["name"]))
        for _ in range(args.steps):  # round-robin, one step of each in turn: load from others hits all alike
            for key, (fn, _) in stream_ops.items():
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                stream_times[key].append(time.perf_counter() - t)
            for run in runs:
                if not run["flat"]:
                    _restore(params, grads)
                elif run["new_grads"] is not None:
                    _restore(*run["new_grads"])
                sync(device)
                t = time.perf_counter()
                run["opt"].step()
                sync(device)
                times.setdefault(run["name"], []).append(time.perf_counter() - t)
    for run in runs:
        run["times"] = times[run["name"]]
    buf.clear()
    stream = {k: stream_ops[k][1] * n / statistics.median(v) / 1e9 for k, v in stream_times.items()}
    rows: list[dict[str, Any]] = []
    for run in runs:
        if not run["flat"]:
            _restore(params, grads)
        opt = run.pop("opt")
        run.pop("new_grads")
        transient = transient_bytes(opt, device)
        times = run.pop("times")
        ms = 1e3 * statistics.median(times)
        gbps = run["bytes_per_param"] * n / (ms / 1e3) / 1e9
        rows.append({**run, "ms": ms, "ms_min": 1e3 * min(times), "mparams_per_s": n / (ms / 1e3) / 1e6,
                     "gb_per_s": gbps, "pct_stream": 100 * gbps / stream["triad"],
                     "pct_copy": 100 * gbps / stream["copy"],
                     "state_bytes_per_param": state_bytes(opt) / n,
                     "transient_bytes_per_param": None if transient is None else transient / n})
        del opt
        gc.collect()
    ref = next((r["ms"] for r in rows if r["name"] == PEERS["fused AdamW"]), None)
    for row in rows:
        row["vs_torch_fused_adamw"] = row["ms"] / ref if ref else None
    first = args.first_steps == "yes" or (args.first_steps == "auto" and n >= 10**6)
    for row in rows:
        timed = (("[default" in row["name"] or "[compiled" in row["name"]) and "bf16" not in row["name"]
                 and "new grads" not in row["name"])  # the same first steps as its flat row
        if first and row["family"] == "descend" and timed:
            print(f"  first steps: {row['name']}", file=sys.stderr, flush=True)
            row["first_steps_s"] = first_steps(row["name"], args)
    from descend.train._device import device_name  # here: the first-step processes need only descend.optim

    report = {"device": str(device), "device_name": device_name(device), "threads": args.threads, "params": n,
              "tensors": args.tensors, "equal_sizes": args.equal_sizes, "steps": args.steps * args.rounds,
              "rounds": args.rounds,
              "torch": torch.__version__, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "stream_gb_per_s": stream, "rows": rows}
    report["targets"] = targets(rows, n)
    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    return report


#: The peers every ratio is taken against (they always run).
PEERS = {"fused AdamW": "torch AdamW [fused]", "fused SGD": "torch SGD-momentum [fused]",
         "default AdamW": "torch AdamW [default]", "lion-pytorch": "lion-pytorch Lion"}


def targets(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The targets of the default rows (issue 13) as ratios of this run, each with whether it holds."""
    ms = {r["name"]: r["ms"] for r in rows}
    out: list[dict[str, Any]] = []

    def check(name: str, peer: str, limit: float) -> None:
        if name in ms and peer in ms:
            ratio = ms[name] / ms[peer]
            out.append({"row": name, "against": peer, "ratio": ratio, "limit": limit, "met": ratio <= limit})

    if n >= 10**7:
        check("descend AdamW [default]", PEERS["fused AdamW"], 1.0)
        check("descend SGD-momentum [default]", PEERS["fused SGD"], 1.0)
        for label in ("Lion", "Signum"):
            check(f"descend {label} [default]", PEERS["fused AdamW"], 0.75)
            check(f"descend {label} [default]", PEERS["lion-pytorch"], 0.5)
        check("descend chain ema->softsign->decay [default]", "descend Lion [default]", 1.2)
        for r in rows:
            if "first_steps_s" in r:
                for kind, limit in (("cold", 5.0), ("warm", 0.5)):
                    if kind in r["first_steps_s"]:
                        value = r["first_steps_s"][kind]
                        out.append({"row": r["name"], "against": f"first two steps, {kind} cache (s)",
                                    "ratio": value, "limit": limit, "met": value <= limit})
    else:
        for label in ("AdamW", "SGD-momentum", "Lion", "Signum", "chain ema->softsign->decay"):
            check(f"descend {label} [default]", PEERS["default AdamW"], 1.0)
    return out


def print_table(report: dict[str, Any]) -> None:
    s = report["stream_gb_per_s"]
    print(f"\n{report['params'] / 1e6:g}M float32 parameters in {report['tensors']} tensors, {report['device']} "
          f"({report['device_name']}), "
          f"{report['threads']} threads, torch {report['torch']}; median of {report['steps']} steps "
          f"over {report.get('rounds', 1)} round(s). "
          f"Streaming bandwidth: copy {s['copy']:.1f} GB/s, triad {s['triad']:.1f} GB/s.\n")
    print("| optimizer | ms/step | Mparams/s | bytes/param | GB/s | % copy | vs torch fused AdamW "
          "| state B/param | transient B/param | first steps cold / warm (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        ratio = f"{r['vs_torch_fused_adamw']:.2f}x" if r["vs_torch_fused_adamw"] else "-"
        transient = r["transient_bytes_per_param"]
        transient_text = "-" if transient is None else f"{transient:.2f}"
        first = r.get("first_steps_s") or {}
        first_text = " / ".join(f"{first[k]:.2f}" for k in ("cold", "warm") if k in first) or "-"
        print(f"| {r['name']} | {r['ms']:.2f} | {r['mparams_per_s']:.0f} | {r['bytes_per_param']} | "
              f"{r['gb_per_s']:.1f} | {r['pct_copy']:.0f}% | {ratio} | {r['state_bytes_per_param']:.1f} | "
              f"{transient_text} | {first_text} |")
    if report.get("targets"):
        print("\n| target | against | ratio | limit | met |\n|---|---|---:|---:|---|")
        for t in report["targets"]:
            met = "yes" if t["met"] else "NO"
            print(f"| {t['row']} | {t['against']} | {t['ratio']:.2f} | {t['limit']:g} | {met} |")
    print(f"\nload average (1, 5, 15 min) before {report['load_average_before']}, after {report['load_average_after']}")


if __name__ == "__main__":
    main()
