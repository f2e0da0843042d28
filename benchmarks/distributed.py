"""Training throughput on 1 process vs W processes (torchrun, DDP and FSDP2), same global batch.

Each configuration runs as its own torchrun job (``descend.distributed.launch``): an MLP regression
on synthetic data, ``--warmup`` untimed steps, then ``--steps`` timed optimizer steps (AdamW) of a
fixed global batch split over the ranks (strong scaling: a step does the same work at any W). The
1-process row is the unwrapped model; its steps/s is the baseline of the ratio column. The device
is whatever the ranks get (``descend.distributed.device()``): CPU with gloo here, one GPU per rank
with NCCL on a CUDA machine, where ``--nprocs`` is capped at the GPU count. On CPU the cores are
split evenly (``OMP_NUM_THREADS = cores / W``, or ``--threads``), so every row uses the same CPU.

    python benchmarks/distributed.py                              # small MLP, 1 and 2 processes, CPU
    python benchmarks/distributed.py --model-size 100m --batch 64  # ~100M parameters (a GPU)
    python benchmarks/distributed.py --nprocs 1,2,4 --strategies ddp,fsdp --out /tmp/dist.json
    python benchmarks/distributed.py --trainer --threads 1      # the trainer: `descend train --nproc W`
    python benchmarks/distributed.py --equivalence              # 2 ranks vs 1 process: max |difference|

``--trainer`` times ``descend train`` itself (digits, MLP width 128, AdamW, global batch 32, one
thread per process) at each process count and strategy, as ``steps / summary["seconds"]``: the
training loop only (logging, validation and checkpoints included; start-up and the final
evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).parent / "results" / "distributed.json"
SIZES = {"small": (64, 256, 4), "10m": (512, 1024, 10), "100m": (1024, 4096, 7)}  # in, hidden, depth


def model_shape(size: str) -> tuple[int, int, int]:
    """``(in_features, hidden, depth)`` for a named size or a parameter count (``"25000000"``)."""
    if size in SIZES:
        return SIZES[size]
    try:
        target = int(float(size))
    except ValueError:
        raise SystemExit(f"--model-size must be one of {', '.join(SIZES)} or a parameter count, got {size!r}") \
            from None
    depth = 6
    hidden = max(8, int(math.sqrt(target / depth)))
    return min(hidden, 1024), hidden, depth


def worker(args: argparse.Namespace) -> None:
    import torch

    from descend import distributed as dd
    from descend import optim
    from descend.nn import MLP
    from descend.train import Minibatch

    @dd.entrypoint
    def run() -> None:
        info = dd.setup()
        d_in, hidden, depth = model_shape(args.model_size)
        torch.manual_seed(0)
        model = MLP(d_in, 16, hidden=hidden, depth=depth)
        params = sum(p.numel() for p in model.parameters())
        model = dd.wrap(model, args.strategy)
        opt = optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch * 4, d_in, generator=g).to(info.device)
        y = torch.randn(args.batch * 4, 16, generator=g).to(info.device)
        sampler = Minibatch(len(x), args.batch, seed=0)  # the same global batches on every rank

        def step(t: int) -> None:
            (idx,) = sampler.next_step()
            mine = dd.shard(idx).to(info.device)
            opt.zero_grad(set_to_none=True)
            loss = 0.5 * (model(x[mine]) - y[mine]).square().sum() * dd.grad_scale(len(idx))
            loss.backward()
            opt.step()

        def sync() -> None:
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)
            dd.barrier()

        for t in range(args.warmup):
            step(t)
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        for t in range(args.warmup, args.warmup + args.steps):
            step(t)
        sync()
        seconds = time.perf_counter() - start
        cpu = dd.reduce_metrics({"cpu": time.process_time() - start_cpu})["cpu"]
        if dd.is_main():
            result = {"processes": info.world_size, "strategy": args.strategy, "device": str(info.device),
                      "device_name": torch.cuda.get_device_name(info.device) if info.device.type == "cuda"
                      else "cpu", "threads_per_process": torch.get_num_threads(), "parameters": params,
                      "global_batch": args.batch, "steps": args.steps, "seconds": seconds,
                      "steps_per_s": args.steps / seconds, "examples_per_s": args.steps * args.batch / seconds,
                      "cpu_seconds_per_process": cpu}
            Path(args.result).write_text(json.dumps(result))
        dd.teardown()

    run()


def trainer_rows(args: argparse.Namespace, nprocs: list[int], strategies: list[str]) -> list[dict[str, Any]]:
    """Run ``descend train --nproc W`` per configuration; steps/s of its training loop."""
    import subprocess

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in nprocs:
            for strategy in ["none"] if n == 1 else strategies:
                out = Path(tmp) / f"{n}-{strategy}"
                threads = args.threads or max(1, (os.cpu_count() or 1) // n)
                cmd = [sys.executable, "-m", "descend", "train", "--nproc", str(n), "--steps", str(args.steps),
                       "--optimizer", "adamw", "--threads", str(threads), "--no-progress", "--no-tensorboard",
                       "--out", str(out)] + ([] if strategy == "none" else ["--strategy", strategy])
                subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                               stdout=subprocess.DEVNULL, timeout=3600)
                summary = json.loads((out / "summary.json").read_text())
                rows.append({"processes": n, "strategy": strategy, "threads_per_process": threads,
                             "steps": summary["steps"], "seconds": summary["seconds"],
                             "steps_per_s": summary["steps"] / summary["seconds"]})
    base = next((r["steps_per_s"] for r in rows if r["processes"] == 1), None)
    print(f"\ndescend train, digits, MLP width 128, AdamW, global batch 32, {args.steps} steps "
          f"({os.cpu_count()} CPU cores)\n")
    print("| processes | strategy | threads/process | steps/s | vs 1 process |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['steps_per_s'] / base:.2f}x" if base else "n/a"
        print(f"| {r['processes']} | {r['strategy']} | {r['threads_per_process']} | {r['steps_per_s']:.1f} | {ratio} |")
    return rows


def equivalence(out: Path) -> None:
    """2 gloo ranks vs one process on tests/distributed_scripts/job.py: max |difference| of every weight.

    The job trains a 6-16-16-2 tanh MLP on 64 examples, global batch 11 (shares of 6 and 5, a last
    batch of 9), 20 steps, with each optimizer under DDP, FSDP2 and DDP with flat storage.
    """
    import importlib.util
    import platform

    import torch

    from descend import distributed as dd

    path = Path(__file__).resolve().parent.parent / "tests" / "distributed_scripts" / "job.py"
    spec = importlib.util.spec_from_file_location("descend_distributed_job", path)
    assert spec is not None and spec.loader is not None
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "two.pt"
        start = time.perf_counter()
        code = dd.launch(2, [str(path), "equivalence", "--out", str(result)], env={"OMP_NUM_THREADS": "1"},
                         timeout_s=1800)
        if code != 0:
            raise SystemExit(f"the 2-process job failed (exit code {code})")
        seconds = time.perf_counter() - start
        two = torch.load(result, weights_only=False)
    rows = []
    for case in job.OPTIMIZERS:
        reference = job.run_case(case, "none", job.STEPS)
        for strategy in ("ddp", "fsdp", "ddp_flat"):
            got = two[f"{strategy}/{case}"]
            diff = max(float((got[k] - reference[k]).abs().max()) for k in reference)
            rows.append({"case": case, "strategy": strategy, "max_abs_diff": diff})
    print("| optimizer | DDP | FSDP2 | DDP, flat storage |\n|---|---:|---:|---:|")
    for case in job.OPTIMIZERS:
        cells = [f"{r['max_abs_diff']:.1e}" for r in rows if r["case"] == case]
        print(f"| {case} | " + " | ".join(cells) + " |")
    record = {
        "method": "max |difference| of every parameter, 2 gloo ranks vs the same job in one process, float32, "
        f"{job.STEPS} steps, global batch {job.GLOBAL_BATCH} of {job.N} examples (tests/distributed_scripts/job.py)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "seconds": seconds,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--strategies", default="ddp,fsdp", help="for W > 1: ddp, fsdp")
    parser.add_argument("--model-size", default="small", help=f"{', '.join(SIZES)} or a parameter count")
    parser.add_argument("--batch", type=int, default=256, help="global batch (split over the processes)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (default: cores / W)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--trainer", action="store_true", help="time `descend train --nproc W` instead")
    parser.add_argument("--equivalence", action="store_true", help="2 ranks vs 1 process: weight differences")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.equivalence:
        equivalence(args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("distributed_equivalence.json"))
        return

    import torch

    from descend import distributed as dd

    cap = torch.cuda.device_count() if torch.cuda.is_available() else None
    nprocs = [int(n) for n in args.nprocs.split(",")]
    strategies = args.strategies.split(",")
    if args.trainer:
        out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("distributed_trainer.json")
        trainer = trainer_rows(args, nprocs, strategies)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": trainer}, indent=2) + "\n")
        print(f"\nwrote {out}")
        return
    configs = [(n, s) for n in nprocs for s in (["none"] if n == 1 else strategies)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (n, strategy) in enumerate(configs):
            if cap is not None and n > cap:
                print(f"skipping {n} processes: only {cap} GPU(s)", file=sys.stderr)
                continue
            result = Path(tmp) / f"{i}.json"
            argv = [__file__, "--worker", "--strategy", strategy, "--result", str(result),
                    "--model-size", args.model_size, "--batch", str(args.batch), "--steps", str(args.steps),
                    "--warmup", str(args.warmup)]
            threads = args.threads or max(1, (os.cpu_count() or 1) // n)
            code = dd.launch(n, argv, env={"OMP_NUM_THREADS": str(threads)},
                             timeout_s=3600)
            if code != 0:
                raise SystemExit(f"the {n}-process {strategy} run failed (exit code {code})")
            rows.append(json.loads(result.read_text()))
    base = next((r["steps_per_s"] for r in rows if r["processes"] == 1), None)
    print(f"\nMLP, {rows[0]['parameters']:,} parameters, global batch {args.batch}, AdamW, "
          f"{args.steps} timed steps on {rows[0]['device_name']} ({os.cpu_count()} CPU cores)\n")
    print("| processes | strategy | threads/process | steps/s | examples/s | vs 1 process |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['steps_per_s'] / base:.2f}x" if base else "n/a"
        print(f"| {r['processes']} | {r['strategy']} | {r['threads_per_process']} | {r['steps_per_s']:.1f} | "
              f"{r['examples_per_s']:.0f} | {ratio} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model_size": args.model_size, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
