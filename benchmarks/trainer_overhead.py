"""Trainer overhead: ``Trainer.fit`` against a hand-written PyTorch loop on the same work.

    python benchmarks/trainer_overhead.py [--device cpu|cuda|auto] [--data bundle|loader|both]
        [--steps 2000] [--repeats 5] [--width 128] [--batch-size 32] [--out results.json]

Both train the same MLP on digits with the same optimizer and batch size, on the same device, moving
each batch there as it is used. Two data sources:

- ``bundle``: in-memory tensors; both loops reshuffle per epoch and index the tensors;
- ``loader``: a ``DataLoader`` (shuffled, ``batch_size``) whose batches both loops take as the steps.

The trainer logs rarely (as a long run does), so what is measured is the per-step cost of its loop:
sampling, the finite-loss check (one host sync per step) and the bookkeeping. Two trainer figures:
``fit`` as a whole, which also evaluates (the validation split before the first step, then
train/val/test at the end: work the hand loop does not do), and its loop alone (``trainer.seconds``,
from the first step to the last). Runs alternate and the median of each is kept.
Target: the trainer within 5% of the hand loop's steps per second (ratio >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from descend._io import write_json
from descend.data.registry import load_data
from descend.train import TrainConfig, Trainer, build_model, make_optimizer
from descend.train._device import device_name, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    device: torch.device,
) -> None:
    """The loop one writes by hand: move the batch, forward, loss, backward, step."""
    model.train()
    non_blocking = device.type == "cuda"
    for _ in range(steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def shuffled(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches of in-memory tensors, reshuffled every epoch, forever."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def forever(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--data", choices=["bundle", "loader", "both"], default="both")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_data("digits")
    x, y = data.train.inputs[0], data.train.targets
    pin = device.type == "cuda"
    if pin:
        x, y = x.pin_memory(), y.pin_memory()

    def loader() -> torch.utils.data.DataLoader:
        dataset = torch.utils.data.TensorDataset(x, y)
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, generator=g, pin_memory=pin
        )

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_model("mlp", data, width=args.width).to(device)
        return model, make_optimizer(args.optimizer, model.parameters())

    def timed(run: Callable[[], None]) -> float:
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        return args.steps / (time.perf_counter() - start)

    def time_hand(kind: str) -> float:
        model, opt = fresh()
        batches = shuffled(x, y, args.batch_size, 0) if kind == "bundle" else forever(loader())
        return timed(lambda: hand_loop(model, opt, batches, args.steps, device))

    def time_trainer(kind: str) -> tuple[float, float]:
        """Steps/s of ``fit`` as a whole (its evaluations included) and of its loop alone."""
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
        splits = data if kind == "bundle" else {"train": loader(), "val": data.val, "test": data.test}
        trainer = Trainer(model, opt, splits, config, device=device)
        whole = timed(lambda: trainer.fit())
        return whole, args.steps / trainer.seconds  # seconds: the loop, from its first step to its last

    kinds = ["bundle", "loader"] if args.data == "both" else [args.data]
    load_before = os.getloadavg()
    rows: list[dict[str, object]] = []
    print(
        f"MLP width {args.width}, {args.optimizer}, batch {args.batch_size}, {args.steps} steps, device {device}, "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    print(f"{'data':<10}{'loop':<28}{'steps/s':>12}{'ratio':>8}")
    for kind in kinds:
        time_hand(kind), time_trainer(kind)  # warm-up
        hand, whole, loop = [], [], []
        for _ in range(args.repeats):
            hand.append(time_hand(kind))
            w, lp = time_trainer(kind)
            whole.append(w)
            loop.append(lp)
        h = statistics.median(hand)
        print(f"{kind:<10}{'hand-written':<28}{h:>12.0f}{1.0:>8.3f}")
        rows.append({"data": kind, "loop": "hand-written", "steps_per_s": h, "ratio": 1.0})
        for name, values in (("Trainer.fit (with evals)", whole), ("Trainer loop", loop)):
            t = statistics.median(values)
            print(f"{kind:<10}{name:<28}{t:>12.0f}{t / h:>8.3f}", "(met)" if t / h >= 0.95 else "(NOT met)")
            rows.append({"data": kind, "loop": name, "steps_per_s": t, "ratio": t / h})
    print("target: ratio >= 0.95")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {
            "device": str(device),
            "device_name": device_name(device),
            "threads": args.threads, "torch": torch.__version__, "model": f"MLP width {args.width}",
            "optimizer": args.optimizer, "batch_size": args.batch_size, "steps": args.steps,
            "repeats": args.repeats, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "target": 0.95, "rows": rows,
        })  # fmt: skip


if __name__ == "__main__":
    main()
