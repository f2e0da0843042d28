"""A small training job for tests/test_distributed.py, run by torchrun (2 ranks) or imported (1 process).

    python -m torch.distributed.run --standalone --nproc_per_node=2 job.py equivalence --out res.pt
    ... job.py checkpoint --out res.pt --ckpt DIR          (FSDP2, save after --steps steps)
    ... job.py fail --out res.pt --ckpt DIR --fail-step 5 --fail-rank 1 --mode exit|raise
    ... job.py fail --out res.pt --ckpt DIR --resume       (continue from the latest checkpoint)

The task is least squares with a 3-layer tanh MLP on 64 fixed examples; rank 0 writes the final
parameters (full tensors) of each case to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from descend import distributed as dd
from descend import optim
from descend.data._base import Split
from descend.train import FullBatch, Minibatch, accumulate_gradient

N, D_IN, D_OUT, HIDDEN = 64, 6, 2, 16
ENGINES = ("reference", "foreach", "compiled")  # the engines that run every chain
GLOBAL_BATCH = 11  # shards of 6 and 5 examples, and a last batch of 9 per epoch (5 and 4): unequal on purpose
STEPS = 20


def problem() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N, D_IN, generator=g)
    y = torch.sin(x[:, :D_OUT] * 2) + 0.1 * torch.randn(N, D_OUT, generator=g)
    return x, y


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                         nn.Linear(HIDDEN, D_OUT))


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd_momentum": lambda p, **kw: optim.SGD(p, lr=0.05, momentum=0.9, **kw),
    "adamw": lambda p, **kw: optim.AdamW(p, lr=1e-2, weight_decay=0.1, **kw),
    "lion": lambda p, **kw: optim.Lion(p, lr=1e-3, weight_decay=0.1, **kw),
    "adamw_clip": lambda p, **kw: optim.AdamW(p, lr=1e-2, max_grad_norm=0.05, **kw),
    "full_batch_gd": lambda p, **kw: optim.SGD(p, lr=0.1, **kw),
    "adamw_bf16_state": lambda p, **kw: optim.AdamW(p, lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16, **kw),
}


#: The cases the checkpoint task saves from FSDP2 ranks (bfloat16 state: resharded, and its noise global).
CHECKPOINTED = ("sgd_momentum", "adamw", "lion", "adamw_bf16_state")


def summed_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (model(x) - y).square().sum()


def mean_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """``summed_loss`` per example: the mean over examples of ``0.5·||f(x) - y||²``."""
    return 0.5 * (outputs - targets).square().sum(1).mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int, *, full_batch: bool = False,
          on_step: Callable[[int], None] | None = None) -> None:
    """Steps ``start..stop-1`` of the job; the same code for 1 process and for W ranks.

    Minibatches: the trainer's one sampler (every rank draws the same global batch) and the raw
    recipe, this rank's share with its summed loss times ``W/N``. Full batch: the trainer's one
    gradient accumulator over chunks of 10 examples, each shared by the ranks.
    """
    x, y = problem()
    sampler = Minibatch(N, GLOBAL_BATCH, seed=7)
    for _ in range(start):  # the sampler's stream up to the resumed step
        sampler.next_step()
    for step in range(start, stop):
        if on_step is not None:
            on_step(step)
        opt.zero_grad(set_to_none=True)
        if full_batch:
            accumulate_gradient(model, mean_loss, Split((x,), y), FullBatch(N, chunk_size=10).next_step())
        else:
            (idx,) = sampler.next_step()
            mine = dd.shard(idx)
            (summed_loss(model, x[mine], y[mine]) * dd.grad_scale(len(idx))).backward()
        opt.step()


def run_case(name: str, strategy: str, steps: int = STEPS, engine: str = "auto",
             optimizer: Callable[..., torch.optim.Optimizer] | None = None, flat: bool = False) -> dict[str, Tensor]:
    model = dd.wrap(make_model(), strategy)
    opt = (optimizer or OPTIMIZERS[name])(model.parameters(), engine=engine, **({"flat": True} if flat else {}))
    train(model, opt, 0, steps, full_batch=name == "full_batch_gd")
    return dd.full_state_dict(model)


def engine_cases() -> dict[str, tuple[Callable[..., torch.optim.Optimizer], str]]:
    """Every preset (with clipping, so the global norm crosses shards) under every engine."""
    cases = {}
    for name, cls in optim.OPTIMIZERS.items():
        for engine in ENGINES:
            cases[f"{name}/{engine}"] = (lambda p, cls=cls, **kw: cls(p, lr=1e-2, max_grad_norm=0.5, **kw)), engine
    return cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=["equivalence", "engines", "checkpoint", "fail"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--case", default="adamw")
    parser.add_argument("--fail-step", type=int, default=-1)
    parser.add_argument("--fail-rank", type=int, default=1)
    parser.add_argument("--mode", choices=["exit", "raise"], default="raise")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    dd.setup(timeout_s=30)
    out: dict[str, object] = {"world_size": dd.world_size()}
    t0 = time.perf_counter()
    if args.task == "equivalence":
        for strategy in ("ddp", "fsdp"):
            for name in OPTIMIZERS:
                out[f"{strategy}/{name}"] = run_case(name, strategy, args.steps)
        for name in OPTIMIZERS:  # DDP with flat=True: the optimizer moves the wrapped model's parameters
            out[f"ddp_flat/{name}"] = run_case(name, "ddp", args.steps, "foreach", flat=True)
        try:  # 8-bit state's blocks would straddle FSDP2's shards: refused at the first step
            run_case("adamw", "fsdp", 1, optimizer=lambda p, **kw: optim.AdamW(p, state_dtype="int8", **kw))
            out["fsdp_int8_error"] = None
        except ValueError as err:
            out["fsdp_int8_error"] = str(err)
    elif args.task == "engines":
        for key, (factory, engine) in engine_cases().items():
            out[key] = run_case(key, "fsdp", args.steps, engine, factory)
    elif args.task == "checkpoint":
        for name in CHECKPOINTED:
            model = dd.wrap(make_model(), "fsdp")
            opt = OPTIMIZERS[name](model.parameters())
            train(model, opt, 0, args.steps)
            dd.save_checkpoint(os.path.join(args.ckpt, name), model, opt, extra={"step": args.steps})
    else:  # fail / resume: FSDP2 AdamW, a checkpoint every 2 steps
        model = dd.wrap(make_model(), "fsdp")
        opt = OPTIMIZERS[args.case](model.parameters())
        start = 0
        if args.resume:
            latest = dd.latest_checkpoint(args.ckpt)
            assert latest is not None, f"no checkpoint under {args.ckpt}"
            start = dd.load_checkpoint(latest, model, opt)["step"]
            out["resumed_from"] = start

        def on_step(step: int) -> None:
            if step > start and step % 2 == 0:
                dd.save_checkpoint(os.path.join(args.ckpt, f"step_{step:06d}"), model, opt, extra={"step": step})
            if step == args.fail_step and dd.rank() == args.fail_rank:
                if args.mode == "exit":
                    os._exit(1)
                raise RuntimeError(f"injected failure at step {step}")

        train(model, opt, start, args.steps, on_step=on_step)
        out["final"] = dd.full_state_dict(model)
    out["seconds"] = time.perf_counter() - t0
    if dd.is_main():
        torch.save(out, args.out)
    dd.teardown()


if __name__ == "__main__":
    dd.entrypoint(main)()
