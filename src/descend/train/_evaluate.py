"""Evaluation: the mean loss and metrics of a model on a split, early stopping, and divergence.

Over a split of ``N`` examples (each rank its share, summed over ranks once at the end):

- ``loss``: ``(1/N) Σ_chunks m_c · loss(chunk_c)``, the mean over examples (losses are means);
- classification ``accuracy``: the fraction of target entries where ``argmax(outputs) == target``;
- regression ``rmse = sqrt(mean_{i,k} (σ_k·(f_ik - y_ik))²)`` in the target's original units (``σ`` the
  data's ``target_std``, 1 when the data carries no scaling) and ``r2 = mean_k (1 - SSE_k / SST_k)``,
  ``SST_k = Σ_i (y_ik - ȳ_k)²`` (scale-free, so the same in either unit);
- each user metric ``fn(outputs, targets)``: a per-example tensor ``[m]`` is summed, a scalar counts as
  the chunk's mean; the result is the mean over the ``N`` examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from descend import distributed as dd
from descend.train._data import Source
from descend.train._device import autocast, move
from descend.train._losses import LossFn

__all__ = ["DIVERGENCE_FACTOR", "EarlyStopping", "Metric", "diverged", "evaluate"]

Metric = Callable[[Tensor, Tensor], Tensor]

#: A validation loss this many times its starting value means the run has diverged (and stops).
DIVERGENCE_FACTOR = 100.0


def _add(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, source: Source, *, task: str,
             metrics: Mapping[str, Metric] | None = None, chunk_size: int = 4096, limit: int | None = None,
             bf16: bool = False, device: torch.device, target_std: Tensor | None = None) -> dict[str, float]:
    """The metrics of the module docstring for ``model`` on ``source``; every rank gets the same dict.

    ``chunk_size`` examples go through the model at once; with ``limit``, only that many examples of
    ``source``, evenly spaced (:meth:`~descend.train._data.Source.eval_batches`), are read.

    Each rank runs as many forward passes as every other (an empty share still runs one), since
    FSDP2 gathers parameters in each; a DDP model runs its local replica without collectives.
    """
    module = dd.unwrap(model)
    module.eval()
    acc = torch.float32 if device.type == "mps" else torch.float64
    sums: dict[str, Tensor] = {}
    for piece in source.eval_batches(chunk_size, limit):
        inputs, targets = source.take(piece)
        inputs, targets = move(inputs, targets, device)
        m = int(targets.shape[0])
        with autocast(device, bf16):
            outputs = module(*inputs)
            loss = loss_fn(outputs, targets) if m else outputs.sum() * 0.0
        _add(sums, "n", torch.tensor(float(m), dtype=acc, device=device))
        _add(sums, "loss", loss.detach().to(acc) * m)
        if task == "classification":
            _add(sums, "correct", (outputs.argmax(-1) == targets).sum().to(acc))
            _add(sums, "entries", torch.tensor(float(targets.numel()), dtype=acc, device=device))
        else:
            width = outputs.shape[-1] if outputs.dim() > 1 else 1
            f, y = outputs.to(acc).reshape(-1, width), targets.to(acc).reshape(-1, width)
            _add(sums, "sse", (f - y).square().sum(0))
            _add(sums, "sy", y.sum(0))
            _add(sums, "syy", y.square().sum(0))
            _add(sums, "rows", torch.tensor(float(f.shape[0]), dtype=acc, device=device))
        for name, fn in (metrics or {}).items():
            value = fn(outputs, targets).detach().to(acc) if m else torch.zeros((), dtype=acc, device=device)
            _add(sums, f"metric:{name}", value * m if value.dim() == 0 else value.reshape(m, -1).mean(1).sum())
    if not sums:  # a loader without batches
        return {"loss": math.nan}
    keys = sorted(sums)
    flat = torch.cat([sums[k].reshape(-1) for k in keys]).tolist()  # one transfer
    flat = dd.all_reduce_sum(flat) if dd.world_size() > 1 else flat
    totals: dict[str, Tensor] = {}
    start = 0
    for k in keys:
        count = sums[k].numel()
        totals[k] = torch.tensor(flat[start : start + count], dtype=torch.float64)
        start += count
    n = float(totals["n"])
    result = {"loss": float(totals["loss"]) / n if n else math.nan}
    if task == "classification":
        result["accuracy"] = float(totals["correct"] / totals["entries"]) if n else math.nan
    else:
        sse, rows = totals["sse"], float(totals["rows"])
        scale = torch.ones_like(sse) if target_std is None else torch.as_tensor(target_std, dtype=torch.float64)
        scale = scale.reshape(-1).expand_as(sse) if scale.numel() in (1, sse.numel()) else torch.ones_like(sse)
        result["rmse"] = math.sqrt(float((sse * scale.square()).sum()) / (rows * sse.numel())) if rows else math.nan
        sst = totals["syy"] - totals["sy"].square() / rows if rows else sse
        result["r2"] = float((1 - sse / sst).mean()) if rows and bool((sst > 0).all()) else math.nan
    for name in metrics or {}:
        result[name] = float(totals[f"metric:{name}"]) / n if n else math.nan
    return result


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations without a lower validation loss (``None``: never stop).

    ``best`` and ``best_step`` are the lowest validation loss so far and the step it was seen at.
    """

    patience: int | None = None
    best: float = math.inf
    best_step: int = 0
    bad: int = 0
    stopped: bool = False

    def update(self, loss: float, step: int) -> bool:
        """Record one validation loss; True when it is the best so far."""
        if loss < self.best:
            self.best, self.best_step, self.bad = loss, step, 0
            return True
        self.bad += 1
        if self.patience is not None and self.bad >= self.patience:
            self.stopped = True
        return False

    def reason(self) -> str:
        return (
            f"the validation loss has not improved for {self.bad} evaluations (patience {self.patience}); "
            f"best {self.best:.4g} at step {self.best_step}"
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_step = float(state["best"]), int(state["best_step"])
        self.bad, self.stopped = int(state["bad"]), bool(state["stopped"])


def diverged(start: float | None, loss: float) -> bool:
    """True when the validation ``loss`` is NaN/inf or ``DIVERGENCE_FACTOR`` times or more its value at
    ``start``: the loss exploded. A loss that rises more modestly (overfitting, noise) is not divergence.
    Without a start nothing is known."""
    if start is None or not math.isfinite(start):
        return False
    if not math.isfinite(loss):
        return True
    return loss > start * DIVERGENCE_FACTOR
