"""``descend train`` on a language model against a nanoGPT-style loop in plain PyTorch, on the same work.

    python benchmarks/lm_hand_loop.py [--width 384] [--depth 6] [--heads 6] [--context 64] [--batch-size 32]
        [--steps 600] [--eval-every 100] [--lr 1e-3] [--threads N] [--device auto] [--out results.json]

Both train the same ``TransformerLM`` (same initialisation) on the standard library's bytes
(``stdlib-text``, windows of ``--context``) with AdamW (``lr``, betas 0.9/0.999, weight decay 0.01),
batches drawn in the same order (a per-epoch permutation from the same seeded generator), and
evaluate every ``--eval-every`` steps on the same 16,384 validation tokens. The hand loop is what
nanoGPT's ``train.py`` does: ``torch.optim.AdamW(fused=True)``, forward, cross-entropy, backward,
step, an evaluation and a ``torch.save`` checkpoint at each interval. ``descend train`` runs as a
user runs it (its default AdamW engine, metrics, checkpoints), in a child process.

Reported: each loop's wall time from its first step, the validation loss at each evaluation, and
the time each took to reach the higher of the two final validation losses (the target both reach);
the ratio of those times is the trainer's overhead on a real model (target: at most 1.05).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from descend._io import write_json
from descend._random import generator, seed_everything
from descend.data.text import load_stdlib_text
from descend.nn import TransformerLM, count_parameters
from descend.train._device import device_name, resolve_device

EVAL_TOKENS = 16_384


def hand_loop(args: argparse.Namespace, device: torch.device, out: Path) -> list[dict[str, float]]:
    """The nanoGPT-style loop; returns ``[{"step", "seconds", "val_loss"}]`` at each evaluation."""
    data = load_stdlib_text(0, context=args.context)
    x, y = data.train.inputs[0], data.train.targets
    val_x, val_y = data.val.inputs[0], data.val.targets
    count = min(len(val_x), -(-EVAL_TOKENS // args.context))
    pick = torch.arange(count) * len(val_x) // count  # the examples descend's bounded evaluation reads
    val_x, val_y = val_x[pick], val_y[pick]
    seed_everything(0)
    model = TransformerLM(256, args.context, width=args.width, depth=args.depth, heads=args.heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    g, order, position = generator(0), torch.empty(0, dtype=torch.int64), 0
    chunk = max(1, 4096 // args.context)
    rows = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if position >= len(order):
            order, position = torch.randperm(len(x), generator=g), 0
        batch = order[position : position + args.batch_size]
        position += len(batch)
        xb, yb = x[batch].to(device), y[batch].to(device)
        loss = F.cross_entropy(model(xb).reshape(-1, 256), yb.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                total = sum(
                    float(F.cross_entropy(model(val_x[i : i + chunk].to(device)).reshape(-1, 256),
                                          val_y[i : i + chunk].to(device).reshape(-1), reduction="sum"))
                    for i in range(0, len(val_x), chunk)
                )
            model.train()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, out / "ckpt.pt")
            rows.append({"step": step, "seconds": time.perf_counter() - start, "val_loss": total / val_y.numel()})
    return rows


def descend_run(args: argparse.Namespace, out: Path) -> list[dict[str, float]]:
    command = [sys.executable, "-m", "descend", "train", "--data", "stdlib-text", "--model", "transformer",
               "--width", str(args.width), "--depth", str(args.depth), "--heads", str(args.heads), "--context",
               str(args.context), "--optimizer", "adamw", "--lr", str(args.lr), "--weight-decay", "0.01",
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every),
               "--eval-size", str(EVAL_TOKENS), "--threads", str(args.threads), "--device", args.device,
               "--no-progress", "--out", str(out / "run")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"descend train failed: {done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "seconds": r["seconds"], "val_loss": r["val_loss"]} for r in rows if "val_loss" in r]


def time_to(rows: list[dict[str, float]], target: float) -> float:
    return next(r["seconds"] for r in rows if r["val_loss"] <= target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    params = count_parameters(TransformerLM(256, args.context, width=args.width, depth=args.depth, heads=args.heads))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        loops = {"descend train": descend_run(args, work), "hand loop": hand_loop(args, device, work)}
    target = max(rows[-1]["val_loss"] for rows in loops.values())
    reached = {name: time_to(rows, target) for name, rows in loops.items()}
    ratio = reached["descend train"] / reached["hand loop"]
    print(f"TransformerLM {params / 1e6:.1f}M parameters, {args.steps} steps of {args.batch_size} x {args.context} "
          f"tokens, {device_name(device)} ({args.threads} threads)")
    for name, rows in loops.items():
        print(f"  {name:>13}: {rows[-1]['seconds']:8.1f} s, final validation loss {rows[-1]['val_loss']:.4f} nats/byte "
              f"({rows[-1]['val_loss'] / 0.6931471805599453:.3f} bits/byte); {reached[name]:.1f} s to {target:.4f}")
    print(f"  descend train / hand loop, time to the same validation loss: {ratio:.3f}")
    if args.out is not None:
        write_json(args.out, {
            "device": device.type, "device_name": device_name(device), "threads": args.threads,
            "torch": torch.__version__, "parameters": params, "width": args.width, "depth": args.depth,
            "heads": args.heads, "context": args.context, "batch_size": args.batch_size, "steps": args.steps,
            "eval_every": args.eval_every, "lr": args.lr, "eval_tokens": EVAL_TOKENS, "target_val_loss": target,
            "seconds_to_target": reached, "ratio": ratio, "curves": loops,
        })


if __name__ == "__main__":
    main()
