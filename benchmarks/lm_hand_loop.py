"""``descend train`` on a language model against a nanoGPT-style loop in plain PyTorch, on the same work.

    python benchmarks/lm_hand_loop.py [--width 384] [--depth 6] [--heads 6] [--context 64] [--batch-size 16]
        [--steps 100] [--eval-every 10] [--lr 1e-3] [--eval-tokens 4096] [--threads N] [--device auto] [--repeats 2]
        [--out results.json] [--figure curves.png] [--keep-run DIR]

Both train the same ``TransformerLM`` (same initialisation) on the standard library's bytes
(``stdlib-text``, windows of ``--context``) with AdamW (``lr``, betas 0.9/0.999, weight decay 0.01),
batches drawn in the same order (a per-epoch permutation from the same seeded generator), and
evaluate every ``--eval-every`` steps on the same ``--eval-tokens`` validation tokens and write a checkpoint
there. The hand loop is what nanoGPT's ``train.py`` does: ``torch.optim.AdamW(fused=True)``,
forward, cross-entropy, backward, step, an evaluation and a ``torch.save`` checkpoint at each
interval. ``descend train`` runs as a user runs it (its default AdamW engine, metrics,
checkpoints every ``--eval-every`` steps), in a child process. Both use ``--threads`` threads, and
both clocks start at the first step and stop after each evaluation, before its checkpoint is
written (descend's clock in ``metrics.jsonl`` does the same).

The machine may be shared, so the two loops alternate: ``--repeats 2`` runs descend, hand, hand,
descend (ABBA), ``--repeats 4`` adds hand, descend, descend, hand (BAAB), and each loop's time is its
mean over its repeats, so a slow spell, and the first run's warm-up, falls on both.
Reported: each loop's wall time, the validation loss at each evaluation, and the time each took to
reach the higher of the two final validation losses (the target both reach; linear in time between
evaluations); the ratio of those times is the trainer's overhead on a real model (target: at most
1.05). The two loops compute the same steps up to rounding (torch's fused AdamW and descend's
engine round differently), which is enough for their curves to part after some tens of steps, so
the ratio of the wall times of the same steps and evaluations is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from descend._io import write_json
from descend._random import generator
from descend.data.text import load_stdlib_text
from descend.nn import TransformerLM, count_parameters
from descend.train import seed_everything


def hand_loop(args: argparse.Namespace, device: torch.device, out: Path) -> list[dict[str, float]]:
    """The nanoGPT-style loop; returns ``[{"step", "seconds", "val_loss"}]`` at each evaluation."""
    data = load_stdlib_text(0, context=args.context)
    x, y = data.train.inputs[0], data.train.targets
    val_x, val_y = data.val.inputs[0], data.val.targets
    count = min(len(val_x), -(-args.eval_tokens // args.context))
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
            rows.append({"step": step, "seconds": time.perf_counter() - start, "val_loss": total / val_y.numel()})
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, out / "ckpt.pt")
    return rows


def descend_run(args: argparse.Namespace, out: Path) -> list[dict[str, float]]:
    """``descend train`` in a child process, writing its run to ``out``; its rows at each evaluation."""
    command = [sys.executable, "-m", "descend", "train", "--data", "stdlib-text", "--model", "transformer",
               "--width", str(args.width), "--depth", str(args.depth), "--heads", str(args.heads), "--context",
               str(args.context), "--optimizer", "adamw", "--lr", str(args.lr), "--weight-decay", "0.01", "--l2", "0",
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every),
               "--eval-size", str(args.eval_tokens),
               "--checkpoint-every", str(args.eval_every), "--threads", str(args.threads), "--device", args.device,
               "--no-progress", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"descend train failed: {done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "seconds": r["seconds"], "val_loss": r["val_loss"]} for r in rows if "val_loss" in r]


def sample(run: Path, prompt: str, tokens: int) -> dict[str, str]:
    """``descend generate`` on a kept run: the command as a user types it and the text it printed."""
    args = ["--prompt", prompt, "--tokens", str(tokens), "--temperature", "0.8", "--top-k", "40", "--seed", "0"]
    done = subprocess.run([sys.executable, "-m", "descend", "generate", str(run), *args], capture_output=True,
                          text=True, check=True)
    shown = " ".join(f'"{a}"' if " " in a or not a else a for a in args)
    return {"command": f"descend generate {run.name} {shown}", "text": done.stdout.rstrip("\n")}


def time_to(rows: list[dict[str, float]], target: float) -> float:
    """Seconds at which the validation loss first reaches ``target``, linear in time between evaluations."""
    previous = None
    for r in rows:
        if r["val_loss"] <= target:
            if previous is None or previous["val_loss"] == r["val_loss"]:
                return r["seconds"]
            w = (previous["val_loss"] - target) / (previous["val_loss"] - r["val_loss"])
            return previous["seconds"] + w * (r["seconds"] - previous["seconds"])
        previous = r
    raise ValueError(f"the validation loss never reached {target}")


def resolve(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; any other name as torch reads it."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def describe(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def plot(path: Path, loops: dict[str, list[list[dict[str, float]]]], title: str, target: float) -> None:
    """Validation bits per byte against wall time, every repeat of each loop, and the target both reach."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for (name, repeats), color in zip(loops.items(), ("#0072B2", "#D55E00")):
        for i, rows in enumerate(repeats):
            ax.plot([r["seconds"] for r in rows], [r["val_loss"] / math.log(2) for r in rows], marker="o",
                    markersize=3, color=color, alpha=1.0 if i == 0 else 0.5, label=name if i == 0 else None)
    ax.axhline(target / math.log(2), color="#888888", linestyle=":", linewidth=1, label="target")
    ax.set(xlabel="wall time from the first step (s)", ylabel="validation bits per byte", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="validation tokens each evaluation reads")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop, in ABBA order (default: 2)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers and curves here (JSON)")
    parser.add_argument("--figure", type=Path, default=None, help="plot bits per byte against time here (PNG)")
    parser.add_argument("--keep-run", type=Path, default=None, help="keep descend's first run here (to sample)")
    parser.add_argument("--sample-tokens", type=int, default=300, help="with --keep-run: bytes to sample from it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve(args.device)
    params = count_parameters(TransformerLM(256, args.context, width=args.width, depth=args.depth, heads=args.heads))
    loops: dict[str, list[list[dict[str, float]]]] = {"descend train": [], "hand loop": []}
    # ABBA, then BAAB, ...: a drift over the runs, and whatever the first run of all pays, falls on both loops
    order = [("descend train", "hand loop")[(i + i // 2 + i // 4) % 2] for i in range(2 * args.repeats)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(order):
            work = Path(tmp) / str(i)
            rows = descend_run(args, work) if name == "descend train" else hand_loop(args, device, work.mkdir() or work)
            loops[name].append(rows)
            print(f"  [{i + 1}/{len(order)}] {name}: {rows[-1]['seconds']:.1f} s, "
                  f"validation loss {rows[-1]['val_loss']:.4f}", flush=True)
            if name == "descend train" and len(loops[name]) == 1 and args.keep_run is not None:
                shutil.rmtree(args.keep_run, ignore_errors=True)
                shutil.copytree(work, args.keep_run)
    load_after = os.getloadavg()
    target = max(repeat[-1]["val_loss"] for repeats in loops.values() for repeat in repeats)
    reached = {name: [time_to(rows, target) for rows in repeats] for name, repeats in loops.items()}
    mean = {name: sum(v) / len(v) for name, v in reached.items()}
    ratio = mean["descend train"] / mean["hand loop"]
    wall = {name: sum(r[-1]["seconds"] for r in repeats) / len(repeats) for name, repeats in loops.items()}
    wall_ratio = wall["descend train"] / wall["hand loop"]
    tokens = args.steps * args.batch_size * args.context
    print(f"TransformerLM {params / 1e6:.1f}M parameters, {args.steps} steps of {args.batch_size} x {args.context} "
          f"tokens ({tokens:,} tokens), {describe(device)} ({args.threads} threads), {args.repeats} repeats, "
          "alternating")
    for name, repeats in loops.items():
        final, times = [r[-1]["val_loss"] for r in repeats], [r[-1]["seconds"] for r in repeats]
        print(f"  {name:>13}: {', '.join(f'{t:.1f}' for t in times)} s; final validation loss "
              f"{', '.join(f'{v:.4f}' for v in final)} nats/byte ({min(final) / math.log(2):.3f} bits/byte at best); "
              f"{mean[name]:.1f} s to {target:.4f} (mean of {len(repeats)})")
    print(f"  descend train / hand loop, time to the same validation loss: {ratio:.3f}; "
          f"wall time of the same {args.steps} steps and evaluations: {wall_ratio:.3f}")
    threads = f"{args.threads} thread{'s' if args.threads != 1 else ''}"
    title = (f"TransformerLM {params / 1e6:.1f}M on stdlib-text, {args.steps} steps, {threads}\n"
             f"time to {target / math.log(2):.3f} bits/byte: descend / hand loop = {ratio:.3f}")
    if args.figure is not None:
        plot(args.figure, loops, title, target)
    drawn = sample(args.keep_run, "def ", args.sample_tokens) if args.keep_run and args.sample_tokens else None
    if args.out is not None:
        write_json(args.out, {
            "device": device.type, "device_name": describe(device), "threads": args.threads,
            "torch": torch.__version__, "parameters": params, "width": args.width, "depth": args.depth,
            "heads": args.heads, "context": args.context, "batch_size": args.batch_size, "steps": args.steps,
            "tokens": tokens, "eval_every": args.eval_every, "lr": args.lr, "eval_tokens": args.eval_tokens,
            "repeats": args.repeats, "order": order, "target_val_loss": target,
            "target_bits_per_byte": target / math.log(2), "seconds_to_target": reached,
            "mean_seconds_to_target": mean, "ratio": ratio,
            "mean_wall_seconds": wall, "wall_ratio": wall_ratio, "curves": loops, "sample": drawn,
            "load_average_before": load_before, "load_average_after": load_after,
        })


if __name__ == "__main__":
    main()
