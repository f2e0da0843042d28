"""Which 8-bit code can hold Adam's state: training with the state stored in each code after every step.

    python benchmarks/state_codes.py [--seeds 3] [--steps 400] [--out results.json]

An MLP (64-128-128-10, ReLU) learns scikit-learn's digits with Adam (lr 1e-3, minibatches of 64) while
its state is stored, after every step, in one of the formats of ``descend.optim._blockwise`` (blocks
of 256, a float32 scale each): the first moment ``exp_avg`` and the second ``exp_avg_sq`` each
rounded to the linear code (stochastic rounding) or the dynamic code (nearest), against float32 and
bfloat16 state, rounding stochastically or to the nearest code. Reported per format, over the seeds: the
final training loss and test accuracy, and for the second moment, against the float32 running mean of
the same gradients, the share of its nonzero elements that the code stores as 0 (Adam then divides the
first moment by ``eps`` alone) and the median relative error of the others (at the last step before a
divergence, if any).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from descend import optim
from descend._io import write_json
from descend.optim._blockwise import round_trip

#: name -> (code of exp_avg, code of exp_avg_sq, stochastic rounding); None: stored as the optimizer keeps it
FORMATS: dict[str, tuple[str | None, str | None, bool]] = {
    "float32": (None, None, True),
    "bfloat16, stochastic": (None, None, True),
    "8-bit linear m and v, stochastic": ("linear", "linear", True),
    "8-bit linear m, dynamic v, stochastic": ("linear", "dynamic", True),
    "8-bit dynamic m and v, stochastic": ("dynamic", "dynamic", True),
    "8-bit dynamic m and v, nearest": ("dynamic", "dynamic", False),
}


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def train(fmt: str, seed: int, steps: int, data: tuple[torch.Tensor, ...]) -> dict[str, float]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    state_dtype = torch.bfloat16 if fmt.startswith("bfloat16") else None
    opt = optim.Adam(model.parameters(), lr=1e-3, state_dtype=state_dtype)
    code_m, code_v, stochastic = FORMATS[fmt]
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    exact_v = [torch.zeros_like(p) for p in params]  # v in float32 from the same gradients
    zeroed = error = float("nan")
    for _ in range(steps):
        batch = torch.randint(0, len(xtr), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(xtr[batch]), ytr[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if code_m is None:
            continue
        beta2 = 0.999
        lost = kept = 0
        errors = []
        for p, exact in zip(params, exact_v):
            exact.mul_(beta2).add_(p.grad * p.grad * (1 - beta2))
            state = opt.state[p]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.copy_(round_trip(m, code_m, signed=True, stochastic=stochastic))
            v.copy_(round_trip(v, code_v, signed=False, stochastic=stochastic))
            nonzero = exact > 0
            gone = nonzero & (v == 0)
            lost += int(gone.sum())
            kept += int(nonzero.sum())
            rest = nonzero & ~gone
            errors.append((v[rest] - exact[rest]).abs() / exact[rest])
        if torch.isfinite(loss):  # the last step before a divergence, if any
            zeroed = lost / max(1, kept)
            error = float(torch.cat(errors).median())
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(model(xtr), ytr))
        accuracy = float((model(xte).argmax(1) == yte).float().mean())
    out = {"train_loss": train_loss, "test_accuracy": accuracy}
    if code_m is not None:
        out["v_zeroed"] = zeroed
        out["v_median_relative_error"] = error
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = digits()
    rows = []
    print(f"digits MLP, Adam lr 1e-3, {args.steps} steps of 64 examples, seeds 0..{args.seeds - 1}\n")
    print("| state format | train loss (mean, max) | test accuracy (mean, min) | v stored as 0 | v median rel. error |")
    print("|---|---|---|---|---|")
    for fmt in FORMATS:
        runs = [train(fmt, seed, args.steps, data) for seed in range(args.seeds)]
        losses = [r["train_loss"] for r in runs]
        accs = [r["test_accuracy"] for r in runs]
        row: dict[str, Any] = {"format": fmt, "runs": runs}
        zeroed = [r["v_zeroed"] for r in runs if "v_zeroed" in r]
        rel = [r["v_median_relative_error"] for r in runs if "v_median_relative_error" in r]
        z = f"{100 * statistics.mean(zeroed):.1f}%" if zeroed else "-"
        e = f"{100 * statistics.mean(rel):.2f}%" if rel else "-"
        print(f"| {fmt} | {statistics.mean(losses):.4f}, {max(losses):.4f} | "
              f"{100 * statistics.mean(accs):.2f}%, {100 * min(accs):.2f}% | {z} | {e} |")
        rows.append(row)
    result = {"seeds": args.seeds, "steps": args.steps, "machine": platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "rows": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
