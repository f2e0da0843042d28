"""Full self-attention vs induced-point attention on large point sets: time and peak memory against N.

Times are wall-clock and process CPU time (``time.process_time``, all threads); on a shared machine
the CPU time is the steadier of the two, so the ratios use it. Each measurement runs in its own
subprocess, which builds one block (``SelfAttentionBlock`` or
``InducedAttentionBlock`` from ``descend.nn``, width 64, 4 heads), runs one warm-up
forward+backward on ``x [1, N, width]`` and then ``--repeats`` timed ones (median reported).
Memory is the subprocess's resident-set high-water mark (``ru_maxrss``), reported as is and minus
the RSS measured just before the first forward (the "working" memory of the pass). It counts every
allocation of the process (allocator caches included), so it is an upper bound on what the pass needs.

Full attention is skipped when its ``N x N`` score matrices (``heads * N^2 * 4`` bytes, times 3 for
the softmax, its saved copy and its gradient, the unfused path) would exceed ``--memory-budget-gb``.

    python benchmarks/attention.py                 # N = 1k .. 64k
    python benchmarks/attention.py --quick         # N = 1k .. 8k, one repeat
    python benchmarks/attention.py --sizes 1024,4096 --out /tmp/attn.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from descend._io import write_json  # torch-free: the workers alone import torch, so RSS is theirs

DEFAULT_SIZES = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_SIZES = [1024, 2048, 4096, 8192]
DEFAULT_OUT = Path(__file__).parent / "results" / "attention.json"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(mode: str, n: int, width: int, heads: int, inducing: int, repeats: int, threads: int) -> dict:
    import torch

    from descend.nn import InducedAttentionBlock, SelfAttentionBlock

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    block = SelfAttentionBlock(width, heads) if mode == "full" else InducedAttentionBlock(width, heads, inducing)
    x = torch.randn(1, n, width, requires_grad=True)
    baseline = _rss_mb()
    times, cpu = [], []
    for i in range(repeats + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        block(x).square().mean().backward()
        if i:  # the first pass is a warm-up
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        x.grad = None
        block.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"mode": mode, "n": n, "seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu),
            "peak_rss_mb": peak,
            "working_mb": peak - baseline}


def measure(mode: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, str(n), "--width", str(args.width), "--heads",
           str(args.heads), "--inducing", str(args.inducing), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "n": n, "skipped": f"over the {args.timeout:.0f}s time limit"}
    except subprocess.CalledProcessError as e:
        return {"mode": mode, "n": n, "skipped": f"failed: {e.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], sizes: list[int]) -> str:
    by = {(r["mode"], r["n"]): r for r in rows}
    lines = [
        "| N | full ms (CPU ms) | full peak RSS MB (working) | induced ms (CPU ms) "
        "| induced peak RSS MB (working) | full / induced CPU time | induced CPU time vs previous N |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    prev = None
    for n in sizes:
        f, i = by[("full", n)], by[("induced", n)]

        def cell(r: dict) -> tuple[str, str]:
            if "skipped" in r:
                return "skipped", r["skipped"]
            return (f"{1e3 * r['seconds']:.1f} ({1e3 * r['cpu_seconds']:.0f})",
                    f"{r['peak_rss_mb']:.0f} ({r['working_mb']:.0f})")

        ft, fm = cell(f)
        it, im = cell(i)
        speedup = f"{f['cpu_seconds'] / i['cpu_seconds']:.1f}x" if "seconds" in f and "seconds" in i else "n/a"
        growth = (f"{i['cpu_seconds'] / prev['cpu_seconds']:.2f}x"
                  if prev and "seconds" in i and "seconds" in prev else "")
        lines.append(f"| {n} | {ft} | {fm} | {it} | {im} | {speedup} | {growth} |")
        prev = i
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--quick", action="store_true", help="N = 1k..8k, one timed repeat")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--inducing", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-budget-gb", type=float, default=8.0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.repeats = repeats
    if args.worker:
        mode, n = args.worker
        print(json.dumps(worker(mode, int(n), args.width, args.heads, args.inducing, repeats, args.threads)))
        return
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    rows = []
    for n in sizes:
        scores_gb = 3 * args.heads * n * n * 4 / 2**30
        if scores_gb > args.memory_budget_gb:
            rows.append({"mode": "full", "n": n,
                         "skipped": f"N x N scores need ~{scores_gb:.0f} GB > {args.memory_budget_gb:g} GB budget"})
        else:
            rows.append(measure("full", n, args))
        rows.append(measure("induced", n, args))
        print(f"N={n}: " + "; ".join(json.dumps(r) for r in rows[-2:]), file=sys.stderr, flush=True)
    print(table(rows, sizes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "worker", "sizes")},
               "sizes": sizes,
               "method": "median wall and process CPU time of forward+backward; peak = subprocess ru_maxrss",
               "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
               "torch": importlib.metadata.version("torch"),
               "rows": rows}
    write_json(args.out, payload)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
