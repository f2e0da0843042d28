"""Seeding: the one function that makes a run reproducible, and the one way to get a private generator."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["generator", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device's default generator


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``, independent of the global one."""
    return torch.Generator(device=device).manual_seed(seed)
