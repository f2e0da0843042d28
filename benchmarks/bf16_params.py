"""Step time of bfloat16 parameters rounded stochastically against float32 parameters, per engine.

Run (1 thread; 1M and 10M parameters in 10 tensors; AdamW and Lion; foreach and native engines)::

    python benchmarks/bf16_params.py --out benchmarks/results/bf16_params.json

Rows: float32 parameters and state (the baseline of each optimizer, engine and size); bfloat16 parameters
with float32 state; bfloat16 parameters and state (pure bfloat16 training: 2 bytes a parameter, 2 a gradient,
2 a state value); and, on the foreach engine, bfloat16 parameters and state with ``param_rounding="nearest"``
(torch's bfloat16 arithmetic; the native loop leaves it to the foreach engine). Every optimizer steps fixed
gradients; the rows of one optimizer, engine and size take their steps round-robin, so load from other
processes hits all alike, and the table reports each row's median step time and its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from descend import optim
from descend._io import write_json

#: (label, parameter dtype, state dtype, param_rounding)
MODES = [
    ("float32 params, float32 state", torch.float32, None, "stochastic"),
    ("bf16 params (stochastic), float32 state", torch.bfloat16, torch.float32, "stochastic"),
    ("bf16 params (stochastic), bf16 state", torch.bfloat16, torch.bfloat16, "stochastic"),
    ("bf16 params (nearest), bf16 state", torch.bfloat16, None, "nearest"),
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def build(name: str, engine: str, n: int, tensors: int, dtype: torch.dtype, state_dtype: torch.dtype | None,
          rounding: str) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    sizes = [n // tensors] * tensors
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in sizes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
    kw: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.1, "engine": engine, "state_dtype": state_dtype,
                          "param_rounding": rounding}
    opt = getattr(optim, name)(params, **kw)
    return opt, params


def measure(name: str, engine: str, n: int, tensors: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    modes = [m for m in MODES if not (engine == "native" and m[3] == "nearest")]
    built = [build(name, engine, n, tensors, dtype, sd, rounding) for _, dtype, sd, rounding in modes]
    times: list[list[float]] = [[] for _ in modes]
    for step in range(warmup + steps):
        for i, (opt, _) in enumerate(built):
            start = time.perf_counter()
            opt.step()
            if step >= warmup:
                times[i].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    rows = []
    for (label, *_), (opt, _), t in zip(modes, built, times):
        median = statistics.median(t)
        kernels = sorted({run.kernel for run in opt.last_step_kernels})
        rows.append({"optimizer": name, "engine": engine, "params": n, "mode": label, "kernels": kernels,
                     "median_ms": median * 1e3, "ratio": median / base})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="1M,10M", help="comma-separated parameter counts")
    parser.add_argument("--tensors", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--optimizers", default="AdamW,Lion")
    parser.add_argument("--engines", default="foreach,native")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    print(f"{'optimizer':9} {'engine':8} {'params':>7}  {'mode':42} {'kernels':10} {'ms':>8} {'ratio':>6}")
    for n in map(parse_count, args.params.split(",")):
        for name in args.optimizers.split(","):
            for engine in args.engines.split(","):
                for row in measure(name, engine, n, args.tensors, args.steps, args.warmup):
                    rows.append(row)
                    print(f"{row['optimizer']:9} {row['engine']:8} {row['params']:>7,}  {row['mode']:42} "
                          f"{','.join(row['kernels']):10} {row['median_ms']:8.2f} {row['ratio']:6.2f}")
    if args.out:
        write_json(Path(args.out), {"threads": args.threads, "tensors": args.tensors, "steps": args.steps,
                                    "torch": torch.__version__, "machine": platform.machine(), "cpu": cpu_name(),
                                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                                    "rows": rows})


if __name__ == "__main__":
    main()
