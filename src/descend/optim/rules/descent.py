"""Descent and regularisation: the descent step, L2, decoupled decay, clipping, projections."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from descend.optim.rules.base import Hyper, Rule, State, WeightRule, check_range


class ScaleByLR(Rule):
    name = "scale_by_lr"
    lr_step = True
    keeps_bound = True

    def __init__(self) -> None:
        super().__init__()
        self.keys = {"lr": "lr"}

    def validate(self, hp: Hyper) -> None:
        check_range("lr", hp["lr"], 0.0, math.inf)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return u * -hp["lr"]

    def equation(self) -> str:
        return "u ← −lr·u"


class L2(Rule):
    name = "l2"

    def __init__(self, weight_decay: float) -> None:
        super().__init__(weight_decay=weight_decay)

    def validate(self, hp: Hyper) -> None:
        check_range("weight_decay", hp["weight_decay"], 0.0, math.inf)

    def active(self, hp: Hyper) -> bool:
        return float(hp["weight_decay"]) != 0.0

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return u + w * hp["weight_decay"]

    def equation(self) -> str:
        return "u ← u + λ·w   (L2 penalty λ/2·‖w‖² in the loss)"


class DecoupledDecay(WeightRule):
    """Acts on the weights (its place in a chain does not matter): engines fold it into ``w <- weight_factor*w + u``."""

    name = "decoupled_decay"
    scales_weights = True

    def __init__(self, weight_decay: float, *, lr_scaled: bool = True) -> None:
        super().__init__(weight_decay=weight_decay)
        self.lr_scaled = lr_scaled

    def validate(self, hp: Hyper) -> None:
        check_range("weight_decay", hp["weight_decay"], 0.0, math.inf)

    def active(self, hp: Hyper) -> bool:
        return float(hp["weight_decay"]) != 0.0

    def weight_factor(self, hp: Hyper, lr: Any) -> Any:
        return 1 - lr * hp["weight_decay"] if self.lr_scaled else 1 - hp["weight_decay"]

    def radius(self, hp: Hyper, lr: float, bounded: bool) -> float | None:
        """``1/lambda`` (``lr/lambda`` if not lr-scaled) after a bounded update: beyond it the decay
        ``lambda*|w|`` outweighs any step, so ``|w|`` shrinks."""
        lam = float(hp["weight_decay"])
        if not bounded or lam <= 0:
            return None
        return 1.0 / lam if self.lr_scaled else lr / lam

    def equation(self) -> str:
        if self.lr_scaled:
            return "w ← (1 − lr·λ)·w   (decoupled decay)"
        return "w ← (1 − λ)·w   (decoupled decay, independent of lr)"


class ClipByGlobalNorm(Rule):
    """The engine computes ``||g||_2`` before the chain runs and passes the factor as ``clip_coef``."""

    name = "clip_by_global_norm"
    global_norm = True
    keeps_bound = True

    def __init__(self, max_norm: float = 1.0) -> None:
        super().__init__(max_grad_norm=max_norm)

    def validate(self, hp: Hyper) -> None:
        check_range("max_grad_norm", hp["max_grad_norm"], 0.0, math.inf, low_open=True)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return u * hp["clip_coef"]

    def equation(self) -> str:
        return "u ← u · min(1, c / ‖g‖₂)   (‖g‖₂ over all parameters)"


class Projection(WeightRule):
    """:meth:`project_` acts on ``w`` itself, so the constraint holds exactly, with no rounding from ``w + u``."""

    projects = True

    def __init__(self, kind: str = "box", radius: float = 1.0) -> None:
        if kind not in ("box", "ball"):
            raise ValueError(f"constraint must be 'box' or 'ball', got {kind!r}")
        super().__init__(radius=radius)
        self.kind = kind
        self.elementwise = kind == "box"  # type: ignore[misc]  (a ball needs each parameter whole)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"project_{self.kind}"

    def validate(self, hp: Hyper) -> None:
        check_range("radius", hp["radius"], 0.0, math.inf, low_open=True)

    def project_(self, w: Tensor, hp: Hyper) -> None:
        r = hp["radius"]
        if self.kind == "box":
            w.clamp_(-r, r)
        elif w.numel():
            norm = torch.linalg.vector_norm(w, dtype=torch.promote_types(w.dtype, torch.float32))
            w.mul_(torch.clamp(r / torch.clamp(norm, min=1e-30), max=1.0).to(w.dtype))

    def radius(self, hp: Hyper, lr: float, bounded: bool) -> float | None:
        return float(hp["radius"]) if self.kind == "box" else None

    def equation(self) -> str:
        if self.kind == "box":
            return "w ← clamp(w, −r, r)   (‖w‖∞ ≤ r)"
        return "w ← w · min(1, r/‖w‖₂)   (‖w‖₂ ≤ r)"


def scale_by_lr() -> Rule:
    """The descent step ``u <- -lr * u``, with the group's ``lr``. Appended to every chain that does not place it."""
    return ScaleByLR()


def l2(weight_decay: float) -> Rule:
    """L2 regularisation (coupled weight decay): ``u <- u + lambda * w``, the gradient of ``lambda/2 * ||w||^2``.

    Put it first, before momentum or normalisation: that is torch's ``Adam(weight_decay=...)`` and ``SGD``.
    """
    return L2(weight_decay)


def decoupled_decay(weight_decay: float, *, lr_scaled: bool = True) -> Rule:
    """Decoupled weight decay ``w <- (1 - lr*lambda) * w`` before the update is added (AdamW, Lion).

    With ``lr_scaled=False`` the decay is ``w <- (1 - lambda) * w``, independent of the learning-rate
    schedule. After a sign-like rule (``|u| <= 1``) it bounds the weights: ``||w||_inf <= 1/lambda``
    (``lr/lambda`` if not lr-scaled).
    """
    return DecoupledDecay(weight_decay, lr_scaled=lr_scaled)


def clip_by_global_norm(max_norm: float = 1.0) -> Rule:
    """Gradient clipping by global norm: ``u <- u * min(1, max_norm / (||g||_2 + 1e-6))``.

    ``||g||_2`` is the norm over every gradient of the optimizer (all groups), as
    ``torch.nn.utils.clip_grad_norm_``. Must be the first rule of a chain.
    """
    return ClipByGlobalNorm(max_norm)


def project_box(radius: float) -> Rule:
    """After the step, ``w <- clamp(w, -radius, radius)`` (``||w||_inf <= radius``)."""
    return Projection("box", radius)


def project_ball(radius: float) -> Rule:
    """After the step, ``w <- w * min(1, radius/||w||_2)`` per parameter tensor."""
    return Projection("ball", radius)
