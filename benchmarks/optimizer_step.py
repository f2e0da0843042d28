"""Optimizer step time at the memory-bandwidth limit: descend's engines against torch.optim and peers.

Run (2 threads, 20M float32 parameters in 100 tensors)::

    python benchmarks/optimizer_step.py --params 20M --tensors 100 --threads 2 --out bench.json
    python -m benchmarks.optimizer_step --quick

Every optimizer steps the same parameters with fixed gradients; the table reports the median step
time over the timed steps (after warm-up, which includes any compilation), parameters per second,
the effective bandwidth under a stated byte model (bytes read + written per parameter, float32:
parameter r/w 8, gradient read 4, each state tensor r/w 8, or 4 in bfloat16), the ratio to
``torch.optim.AdamW(fused=True)`` and the share of the machine's streaming bandwidth measured in the
same run (triad ``a = b + s*c`` over the same number of elements). Memory: optimizer state bytes per
parameter, and the transient memory a step allocates on top (peak of the allocator's running total
during one step, from ``torch.profiler``'s memory events on CPU or ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from descend import optim

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def parse_count(text: str) -> int:
    """``"20M"`` -> 20_000_000 (suffixes K, M, G)."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_params(n: int, tensors: int, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    """``tensors`` parameters (sizes varying by up to +-50% around the mean) holding ``n`` values in all."""
    gen = torch.Generator().manual_seed(seed)
    weights = 0.5 + torch.rand(tensors, generator=gen)
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


def _mmap_large_allocations() -> None:
    """Make glibc serve every allocation over 64 KiB by mmap and return it on free, so RSS follows
    the live tensors and its high-water mark measures a step's transient memory."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixing it also stops glibc raising it after frees)
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD


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

    ``flat`` rows are descend optimizers with ``flat=True``: each gets its own copy of the parameters
    (the optimizer moves them into one buffer), the others share one set.
    """
    out: list[tuple[str, str, Factory, int, bool]] = []
    wd = 0.01
    descend: list[tuple[str, Callable[..., torch.optim.Optimizer], int, bool]] = [
        ("SGD-momentum", lambda p, **k: optim.SGD(p, lr=1e-3, momentum=0.9, **k), 20, False),
        ("Adam", lambda p, **k: optim.Adam(p, lr=1e-3, **k), 28, False),
        ("AdamW", lambda p, **k: optim.AdamW(p, lr=1e-3, weight_decay=wd, **k), 28, False),
        ("Lion", lambda p, **k: optim.Lion(p, lr=1e-4, weight_decay=wd, **k), 20, False),
        ("Signum", lambda p, **k: optim.Signum(p, lr=1e-4, weight_decay=wd, **k), 20, False),
        ("chain ema->softsign->decay", lambda p, **k: optim.chain(p, optim.ema(0.9), optim.softsign(1e-8),
                                                                  optim.decoupled_decay(wd), lr=1e-4, **k), 20, False),
        ("Lion bf16 state", lambda p, **k: optim.Lion(p, lr=1e-4, weight_decay=wd, state_dtype=torch.bfloat16, **k),
         16, True),
        ("Signum bf16 state", lambda p, **k: optim.Signum(p, lr=1e-4, weight_decay=wd, state_dtype=torch.bfloat16,
                                                          **k), 16, True),
    ]
    for engine in engines:
        for layout in layouts:
            flat = layout == "flat"
            if flat and engine == "reference":  # the reference engine steps one tensor at a time anyway
                continue
            tag = f"{engine}, flat" if flat else engine
            for label, make, nbytes, fast_only in descend:
                if fast_only and engine == "reference":
                    continue
                out.append((f"descend {label} [{tag}]", "descend",
                            lambda p, m=make, e=engine, f=flat: m(p, engine=e, flat=f), nbytes, flat))
    for impl, kw in (("single-tensor", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        out += [
            (f"torch SGD-momentum [{impl}]", "torch",
             lambda p, k=kw: torch.optim.SGD(p, lr=1e-3, momentum=0.9, **k), 20, False),
            (f"torch Adam [{impl}]", "torch", lambda p, k=kw: torch.optim.Adam(p, lr=1e-3, **k), 28, False),
            (f"torch AdamW [{impl}]", "torch",
             lambda p, k=kw: torch.optim.AdamW(p, lr=1e-3, weight_decay=wd, **k), 28, False),
        ]
    with contextlib.suppress(ImportError):
        import lion_pytorch

        out.append(("lion-pytorch Lion", "lion-pytorch",
                    lambda p: lion_pytorch.Lion(p, lr=1e-4, weight_decay=wd, decoupled_weight_decay=False), 20,
                    False))
    with contextlib.suppress(Exception):
        import heavyball

        out.append(("heavyball AdamW", "heavyball", lambda p: heavyball.AdamW(p, lr=1e-3, weight_decay=wd), 28,
                    False))
    with contextlib.suppress(ImportError):
        import optax  # noqa: F401  (JAX; not comparable in-process with torch tensors, reported as absent)
    return out


def _restore(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    for p, g in zip(params, grads):  # some peers (heavyball) consume .grad: every step sees the same gradients
        p.grad = g
    return params


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--params", default="20M", help="total parameter count, e.g. 1M, 20M, 100M")
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25, help="timed steps per optimizer (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--engines", default="reference,foreach,compiled")
    parser.add_argument("--layouts", default="tensors,flat", help="descend's parameter layouts: 'tensors' "
                        "(the model's own tensors) and/or 'flat' (flat=True: one buffer per group)")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching rows "
                        "(torch AdamW [fused], the reference of the ratios, always runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="1M parameters, foreach engine, 5 steps: a smoke run")
    parser.add_argument("--out", default="benchmarks/optimizer_step.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.params, args.steps, args.warmup, args.engines = "1M", 5, 1, "foreach"
    torch.set_num_threads(args.threads)
    _mmap_large_allocations()
    device = torch.device(args.device)
    n = parse_count(args.params)
    warnings.filterwarnings("ignore", category=UserWarning)
    params = make_params(n, args.tensors, device)
    grads = [p.grad for p in params]
    only = [s for s in args.only.split(",") if s]
    # Build and warm up every optimizer (compilation happens here), then time them round-robin, one
    # step of each in turn, so load from other processes on a shared machine hits all of them alike.
    runs: list[dict[str, Any]] = []
    for name, family, factory, nbytes, flat in candidates(args.engines.split(","), args.layouts.split(",")):
        if only and name != "torch AdamW [fused]" and not any(s in name for s in only):
            continue
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
        del own_grads
        warm = time.perf_counter() - t0
        print(f"  ready: {name} (warm-up {warm:.1f} s)", file=sys.stderr, flush=True)
        runs.append({"name": name, "family": family, "bytes_per_param": nbytes, "opt": opt, "times": [],
                     "warmup_s": warm, "flat": flat})
    buf = [torch.empty(n, device=device).uniform_() for _ in range(3)]
    stream_ops = {"copy": (lambda: buf[0].copy_(buf[1]), 8),
                  "triad": (lambda: torch.add(buf[1], buf[2], alpha=0.5, out=buf[0]), 12)}
    stream_times: dict[str, list[float]] = {k: [] for k in stream_ops}
    for _ in range(args.steps):
        for key, (fn, _) in stream_ops.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            stream_times[key].append(time.perf_counter() - t)
        for run in runs:
            if not run["flat"]:
                _restore(params, grads)
            sync(device)
            t = time.perf_counter()
            run["opt"].step()
            sync(device)
            run["times"].append(time.perf_counter() - t)
    buf.clear()
    stream = {k: stream_ops[k][1] * n / statistics.median(v) / 1e9 for k, v in stream_times.items()}
    rows: list[dict[str, Any]] = []
    for run in runs:
        if not run["flat"]:
            _restore(params, grads)
        opt = run.pop("opt")
        transient = transient_bytes(opt, device)
        times = run.pop("times")
        ms = 1e3 * statistics.median(times)
        gbps = run["bytes_per_param"] * n / (ms / 1e3) / 1e9
        rows.append({**run, "ms": ms, "ms_min": 1e3 * min(times), "mparams_per_s": n / (ms / 1e3) / 1e6,
                     "gb_per_s": gbps, "pct_stream": 100 * gbps / stream["triad"],
                     "state_bytes_per_param": state_bytes(opt) / n,
                     "transient_bytes_per_param": None if transient is None else transient / n})
        del opt
        gc.collect()
    ref = next((r["ms"] for r in rows if r["name"] == "torch AdamW [fused]"), None)
    for row in rows:
        row["vs_torch_fused_adamw"] = row["ms"] / ref if ref else None
    report = {"device": str(device), "threads": args.threads, "params": n, "tensors": args.tensors,
              "steps": args.steps, "torch": torch.__version__, "stream_gb_per_s": stream, "rows": rows}
    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def print_table(report: dict[str, Any]) -> None:
    s = report["stream_gb_per_s"]
    print(f"\n{report['params'] / 1e6:g}M float32 parameters in {report['tensors']} tensors, {report['device']}, "
          f"{report['threads']} threads, torch {report['torch']}; median of {report['steps']} steps. "
          f"Streaming bandwidth: copy {s['copy']:.1f} GB/s, triad {s['triad']:.1f} GB/s.\n")
    print("| optimizer | ms/step | Mparams/s | bytes/param | GB/s | % triad | vs torch fused AdamW "
          "| state B/param | transient B/param |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        ratio = f"{r['vs_torch_fused_adamw']:.2f}x" if r["vs_torch_fused_adamw"] else "-"
        transient = r["transient_bytes_per_param"]
        transient_text = "-" if transient is None else f"{transient:.2f}"
        print(f"| {r['name']} | {r['ms']:.1f} | {r['mparams_per_s']:.0f} | {r['bytes_per_param']} | "
              f"{r['gb_per_s']:.1f} | {r['pct_stream']:.0f}% | {ratio} | {r['state_bytes_per_param']:.1f} | "
              f"{transient_text} |")


if __name__ == "__main__":
    main()
