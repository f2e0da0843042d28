"""Trainer overhead: ``Trainer.fit`` against a hand-written PyTorch loop on the same work.

    python benchmarks/trainer_overhead.py [--steps 2000] [--repeats 5] [--width 128] [--batch-size 32]

Both train the same MLP on digits with the same optimizer, batch size and per-epoch reshuffling; the
trainer logs rarely (as a long run does), so what is measured is the per-step cost of its loop:
sampling, the finite-loss check and the bookkeeping (plus ``fit``'s one final
evaluation). Runs alternate and the median of each is kept.
Target: the trainer within 5% of the hand loop's steps per second (ratio >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from descend.data.registry import load_data
from descend.train import TrainConfig, Trainer, build_model, make_optimizer


def hand_loop(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch_size: int,
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(x), generator=g), 0
    model.train()
    for _ in range(steps):
        if pos >= len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += len(idx)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data("digits")
    x, y = data.train.inputs[0], data.train.targets

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_model("mlp", data, width=args.width)
        return model, make_optimizer(args.optimizer, model.parameters())

    def time_hand() -> float:
        model, opt = fresh()
        start = time.perf_counter()
        hand_loop(model, opt, x, y, args.steps, args.batch_size, 0)
        return args.steps / (time.perf_counter() - start)

    def time_trainer() -> float:
        model, opt = fresh()
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            l2=0.0,
            eval_every=10**9,
            log_every=10**9,
            progress=False,
            tensorboard=False,
        )
        trainer = Trainer(model, opt, data, config)
        start = time.perf_counter()
        trainer.fit()  # includes its final evaluation of train/val/test, which the hand loop does not do
        return args.steps / (time.perf_counter() - start)

    time_hand(), time_trainer()  # warm-up
    hand, ours = [], []
    for _ in range(args.repeats):
        hand.append(time_hand())
        ours.append(time_trainer())
    h, t = statistics.median(hand), statistics.median(ours)
    print(
        f"MLP width {args.width}, {args.optimizer}, batch {args.batch_size}, {args.steps} steps, "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    print(f"{'loop':<20}{'steps/s':>12}{'ratio':>8}")
    print(f"{'hand-written':<20}{h:>12.0f}{1.0:>8.3f}")
    print(f"{'descend Trainer':<20}{t:>12.0f}{t / h:>8.3f}")
    print("target: ratio >= 0.95", "(met)" if t / h >= 0.95 else "(NOT met)")


if __name__ == "__main__":
    main()
