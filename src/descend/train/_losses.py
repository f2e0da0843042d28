"""Losses: the data term (mean squared error, cross-entropy or any callable) and the L2 penalty.

All data losses are *means over examples*, so the loss of a set split into chunks of sizes
``m_1 .. m_k`` (``M = Σ m_j``) is exactly ``Σ_j (m_j / M) · loss(chunk_j)``; that is what lets
full-batch gradient descent accumulate the whole-set gradient chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["LOSSES", "LossFn", "cross_entropy", "get_loss", "l2_penalty", "mse"]


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """``mean((outputs - targets)²)`` over every element; ``targets`` is reshaped to ``outputs``."""
    return F.mse_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """``mean_i -log softmax(outputs_i)[targets_i]``; ``outputs [..., C]`` logits, ``targets [...]`` ints."""
    logits = outputs if outputs.dim() == 2 else outputs.reshape(-1, outputs.shape[-1])
    if logits.dtype not in (torch.float32, torch.float64):  # bf16/fp16 logits: softmax in float32
        logits = logits.float()
    return F.cross_entropy(logits, targets if targets.dim() == 1 else targets.reshape(-1))


LOSSES: dict[str, LossFn] = {"mse": mse, "cross_entropy": cross_entropy}


def get_loss(loss: str | LossFn, task: str | None = None) -> LossFn:
    """The loss ``loss`` names (``"mse"``, ``"cross_entropy"``; ``"auto"``: by ``task``) or ``loss`` itself."""
    if callable(loss):
        return loss
    if loss == "auto":
        if task not in ("classification", "regression"):
            raise ValueError(f"loss='auto' needs task 'classification' or 'regression', got {task!r}")
        return cross_entropy if task == "classification" else mse
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not supported; expected one of {('auto', *LOSSES)} or a callable")
    return LOSSES[loss]


def l2_penalty(params: Iterable[Tensor], l2: float) -> Tensor:
    """``λ/2 · Σ_p ||p||²``: the regularisation term added to the loss (its gradient is ``λ·p``).

    This is the *loss-side* view; an optimizer's ``weight_decay`` acts on the update instead, and
    the two differ for every method that rescales the gradient (Adam, sign methods).
    """
    params = list(params)
    return 0.5 * l2 * torch.stack([p.pow(2).sum() for p in params]).sum()
