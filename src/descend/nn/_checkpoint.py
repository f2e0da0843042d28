"""Activation checkpointing: a block's activations recomputed in the backward pass instead of stored.

With ``checkpoint=True`` a network stores only each block's input during the forward pass; the
backward pass runs the block again to get what it needs (:func:`torch.utils.checkpoint.checkpoint`,
non-reentrant). Activation memory falls from every intermediate of every block to one tensor per
block plus one block's intermediates, for about one more forward pass of compute. Gradients are
unchanged: the recomputation is the same arithmetic on the same inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["run_block"]


def run_block(block: nn.Module, *args: Any, recompute: bool) -> Tensor:
    """``block(*args)``; with ``recompute`` (and autograd recording), its activations are recomputed in backward."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)  # type: ignore[no-any-return]
    return block(*args)  # type: ignore[no-any-return]
