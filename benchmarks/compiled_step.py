"""``torch.compile(opt.step)``: descend's traced step against torch's compiled AdamW, under an LR schedule.

    python benchmarks/compiled_step.py [--params 1M] [--tensors 20] [--steps 30] [--rounds 3] [--threads 2]
        [--out results.json]

Every optimizer steps its own copy of the same float32 parameters with fixed gradients, its step
wrapped in ``torch.compile`` and a cosine LR schedule stepped after every step (OneCycleLR with
momentum cycling for the ``onecycle`` rows), as a training loop would. torch's AdamW gets
``lr=torch.tensor(...)``, torch's advice for compiling a scheduled step; descend's take the plain float.
After ``--warmup`` steps (compiling, and the one recompile dynamo makes when a float first changes),
rounds of ``--steps`` timed steps follow, the optimizers taking turns in a rotated order so that load
from other processes hits all alike; the table reports each one's median step time, its fastest
step (steadier on a loaded machine), its ratio to torch's compiled AdamW, and the graphs dynamo
compiled after warm-up (0: no recompiles). Eager rows
(descend's default engine, torch's fused AdamW) give the context.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchmarks.optimizer_step import make_params, parse_count, sync
from descend import optim
from descend._io import write_json

WD = 0.01
Make = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

#: (name, optimizer factory, compiled, schedule)
ROWS: list[tuple[str, Make, bool, str]] = [
    ("torch AdamW [compiled, lr tensor]",
     lambda p: torch.optim.AdamW(p, lr=torch.tensor(1e-3), weight_decay=WD), True, "cosine"),
    ("descend AdamW [compiled]", lambda p: optim.AdamW(p, lr=1e-3, weight_decay=WD), True, "cosine"),
    ("descend AdamW [compiled, onecycle]", lambda p: optim.AdamW(p, lr=1e-3, weight_decay=WD), True, "onecycle"),
    ("descend Lion [compiled]", lambda p: optim.Lion(p, lr=1e-4, weight_decay=WD), True, "cosine"),
    ("descend Signum [compiled, onecycle]", lambda p: optim.Signum(p, lr=1e-4, weight_decay=WD), True, "onecycle"),
    ("torch AdamW [fused, eager]", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=WD, fused=True), False,
     "cosine"),
    ("descend AdamW [default, eager]", lambda p: optim.AdamW(p, lr=1e-3, weight_decay=WD), False, "cosine"),
]


def scheduler(opt: torch.optim.Optimizer, kind: str, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)


def graphs() -> int:
    """Graphs dynamo has compiled in this process (a recompile adds one)."""
    return int(counters["stats"]["unique_graphs"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--params", default="1M", help="total parameter count, e.g. 100K, 1M, 20M")
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per optimizer and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching rows")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    n = parse_count(args.params)
    only = [s for s in args.only.split(",") if s]
    rows = [r for r in ROWS if not only or any(s in r[0] for s in only)]
    total = args.warmup + args.rounds * args.steps + 1

    runs = []
    for name, make, compiled, kind in rows:
        params = make_params(n, args.tensors, device)
        opt = make(params)
        sched = scheduler(opt, kind, total)
        runs.append({"name": name, "step": torch.compile(opt.step) if compiled else opt.step, "sched": sched,
                     "times": [], "new_graphs": 0})
    for run in runs:  # compiling, state creation, the recompile when a scheduled float first changes
        for _ in range(args.warmup):
            run["step"]()
            run["sched"].step()
    for r in range(args.rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        for run in order:
            before = graphs()
            for _ in range(args.steps):
                start = time.perf_counter()
                run["step"]()
                sync(device)
                run["times"].append(time.perf_counter() - start)
                run["sched"].step()
            run["new_graphs"] += graphs() - before

    baseline = statistics.median(runs[0]["times"]) if rows[0][0].startswith("torch AdamW [compiled") else None
    print(f"{n:,} float32 parameters in {args.tensors} tensors, {args.threads} threads, "
          f"{args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up steps\n")
    print("| optimizer | ms/step (median) | ms/step (min) | vs torch compiled AdamW (median) "
          "| graphs compiled after warm-up |")
    print("|---|---|---|---|---|")
    out_rows = []
    for run in runs:
        ms, fastest = 1e3 * statistics.median(run["times"]), 1e3 * min(run["times"])
        ratio = ms / (1e3 * baseline) if baseline else None
        print(f"| {run['name']} | {ms:.3f} | {fastest:.3f} | {f'{ratio:.2f}x' if ratio else '-'} "
              f"| {run['new_graphs']} |")
        out_rows.append({"name": run["name"], "ms": ms, "ms_min": fastest, "vs_torch_compiled_adamw": ratio,
                         "graphs_after_warmup": run["new_graphs"]})
    result = {"params": n, "tensors": args.tensors, "threads": args.threads, "warmup": args.warmup,
              "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__, "rows": out_rows}
    if args.out:
        write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
