"""Your own ``torch.utils.data.Dataset`` with descend's Trainer.

    python examples/custom_dataset.py               # DESCEND_EXAMPLE_QUICK=1: a few steps only

Any map-style Dataset whose items are ``(input, target)`` works, for train, val and test alike: the
trainer draws indices with its own sampler (reshuffled each epoch, resumable), collates the items, and
reports loss and accuracy on each split. The dataset here makes two interleaved spirals and augments each
point with fresh noise every time it is read, as an image dataset would jitter its images.
"""

import math
import os

import torch
from torch.utils.data import Dataset

from descend import optim
from descend.nn import MLP
from descend.train import TrainConfig, Trainer

QUICK = os.environ.get("DESCEND_EXAMPLE_QUICK") == "1"


class Spirals(Dataset):
    """``n`` points on two interleaved spirals; item ``i`` is ``(point [2], label)``, label 0 or 1."""

    def __init__(self, n: int, seed: int, jitter: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        t = torch.rand(n, generator=g) * 3 * math.pi  # position along the spiral
        angle = t + math.pi * self.labels  # the second spiral is the first turned by 180 degrees
        self.points = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / (3 * math.pi)
        self.jitter = jitter

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        point = self.points[i]
        if self.jitter:  # augmentation: a little fresh noise on every read
            point = point + self.jitter * torch.randn(2)
        return point, self.labels[i]


torch.manual_seed(0)
data = {"train": Spirals(2000, seed=0, jitter=0.01), "val": Spirals(400, seed=1), "test": Spirals(400, seed=2)}
model = MLP(2, 2, width=64, depth=3)
opt = optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
config = TrainConfig(steps=30 if QUICK else 3000, batch_size=64, schedule="cosine", eval_every=10 if QUICK else 500)


class StopAtAccuracy:
    """A callback: any object with some of on_step_end, on_validation_end, on_fit_end."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_validation_end(self, trainer, metrics):
        if metrics["val_accuracy"] >= self.target:
            print(f"val accuracy {metrics['val_accuracy']:.3f} at step {trainer.step}: stopping")
            trainer.should_stop = True  # ends the run after this step


# device="auto": CUDA when available, else CPU; the trainer moves the model, the optimizer state and each batch
trainer = Trainer(model, opt, data, config, device="auto", callbacks=[StopAtAccuracy(0.99)], out_dir="runs/spirals")
summary = trainer.fit()  # metrics.jsonl, metrics.csv and checkpoint/ in runs/spirals
print("test:", {k: round(v, 4) for k, v in summary["test"].items()})
