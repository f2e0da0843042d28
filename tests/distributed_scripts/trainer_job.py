"""The Trainer under torchrun on whatever device each rank gets (tests/test_cuda.py runs it with NCCL).

    python -m torch.distributed.run --standalone --nproc_per_node=2 trainer_job.py --out weights.pt [--strategy ddp]

Without torchrun it is the one-process reference. Rank 0 saves the final full weights to ``--out``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from descend import distributed as dd
from descend.data._base import DataBundle, Split
from descend.train import TrainConfig, Trainer


def bundle() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
    return DataBundle("toy", "classification", "vector", Split((x[:90],), y[:90]), Split((x[90:105],), y[90:105]),
                      Split((x[105:],), y[105:]), out_features=3, in_features=6)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    dd.setup()  # NCCL and cuda:LOCAL_RANK when CUDA is available
    model = dd.wrap(make_model(), args.strategy if dd.world_size() > 1 else "none")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = TrainConfig(steps=args.steps, batch_size=15, accumulation=2, l2=1e-3, progress=False, tensorboard=False)
    trainer = Trainer(model, opt, bundle(), config)  # device "auto": the rank's device
    trainer.fit()
    weights = dd.full_state_dict(model)
    if dd.is_main():
        torch.save({"weights": weights, "device": str(trainer.device), "world": dd.world_size()}, args.out)
    dd.teardown()


if __name__ == "__main__":
    dd.entrypoint(main)()
