"""Data-parallel training with torchrun: the same steps on 2 processes as on one.

    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py   # 2 processes (gloo on CPU, NCCL on GPUs)
    python examples/ddp_torchrun.py          # starts those 2 processes itself (descend.distributed.launch)
    DESCEND_EXAMPLE_QUICK=1 python examples/ddp_torchrun.py             # a few steps only

A run is defined by its *global* batch: every rank draws the same global batch from a seeded sampler,
keeps its share (``dd.shard``) and scales its summed loss by ``dd.grad_scale(global size)``, so DDP's
average over ranks is exactly the one-process mean gradient, and the optimizer takes the one-process
step. Checkpoints are written by every rank (torch.distributed.checkpoint) and load at any world size.
``descend train --nproc 2`` and ``Trainer`` under torchrun run this loop for you.
"""

import os
import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from descend import distributed as dd
from descend import optim
from descend.nn import MLP
from descend.train import Minibatch

QUICK = os.environ.get("DESCEND_EXAMPLE_QUICK") == "1"
STEPS = 10 if QUICK else 600
CHECKPOINTS = "runs/ddp-example"


@dd.entrypoint  # a failing rank prints "descend: rank R failed: ..." and ends the whole job
def main() -> None:
    info = dd.setup()  # joins torchrun's process group; timeouts on every collective
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = dd.wrap(MLP(64, 10, width=128, depth=2), "ddp")  # or "fsdp" (FSDP2), or "none"
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # build it after wrapping
    sampler = Minibatch(len(x), batch_size=64, seed=0)  # the same global batches on every rank

    start = 0
    if (last := dd.latest_checkpoint(CHECKPOINTS)) is not None:  # resume, at any world size
        extra = dd.load_checkpoint(last, model, opt)
        start = extra["step"]
        sampler.load_state_dict(extra["sampler"])
        if dd.is_main():
            print(f"resumed from {last} at step {start}", flush=True)

    for step in range(start, STEPS):
        (idx,) = sampler.next_step()  # this step's global batch of indices
        mine = dd.shard(idx)  # this rank's contiguous share
        summed = F.cross_entropy(model(x[mine]), y[mine], reduction="sum")
        opt.zero_grad()
        (summed * dd.grad_scale(len(idx))).backward()  # DDP averages: the one-process mean gradient
        opt.step()
        metrics = dd.reduce_metrics({"loss": summed.item() / len(mine)}, count=len(mine))  # global mean
        if dd.is_main() and (step % max(1, STEPS // 6) == 0 or step == STEPS - 1):
            print(f"step {step:4d}  loss {metrics['loss']:.4f}  ({info.world_size} processes)", flush=True)

    if start < STEPS:  # every rank calls it and writes its own shards
        dd.save_checkpoint(f"{CHECKPOINTS}/step_{STEPS:06d}", model, opt,
                           extra={"step": STEPS, "sampler": sampler.state_dict()})
        if dd.is_main():
            print(f"checkpoint written to {CHECKPOINTS}/step_{STEPS:06d}; run again to resume from it", flush=True)
    dd.teardown()


if __name__ == "__main__":
    if dd.launched():  # started by torchrun: this process is one rank
        main()
    else:  # started by python: launch 2 ranks of this same script under torchrun
        sys.exit(dd.launch(2, [os.path.abspath(__file__)]))
