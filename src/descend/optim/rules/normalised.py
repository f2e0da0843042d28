"""Normalised updates: each coordinate's size bounded or rescaled (sign, softsign, Adam, Lion)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from descend.optim.rules.base import Hyper, Rule, State, check_betas, check_range, lerp, lerp_


class Sign(Rule):
    name = "sign"
    bounded = True

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return torch.sign(u)

    def equation(self) -> str:
        return "u ← sign(u)"


class Softsign(Rule):
    name = "softsign"
    bounded = True

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__(eps=eps)

    def validate(self, hp: Hyper) -> None:
        check_range("eps", hp["eps"], 0.0, math.inf, low_open=True)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return u / (u.abs() + hp["eps"])

    def equation(self) -> str:
        return "u ← u / (|u| + ε)"


class ScaleByAdam(Rule):
    """Adam's scaling (the formula: :func:`scale_by_adam`)."""

    name = "adam"
    static = ("amsgrad",)
    nonnegative_state = frozenset({"exp_avg_sq", "max_exp_avg_sq"})

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, amsgrad: bool = False) -> None:
        super().__init__(betas=betas, eps=eps, amsgrad=amsgrad)

    def state_keys(self, hp: Hyper) -> tuple[str, ...]:
        keys = ("exp_avg", "exp_avg_sq")
        return (*keys, "max_exp_avg_sq") if hp["amsgrad"] else keys

    def all_state_keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def validate(self, hp: Hyper) -> None:
        check_betas("betas", hp["betas"])
        check_range("eps", hp["eps"], 0.0, math.inf, low_open=True)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        beta1, beta2 = hp["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g = u.to(m.dtype)
        lerp_(m, g, 1 - beta1)
        v.mul_(beta2).add_(g * (1 - beta2) * g)
        if hp["amsgrad"]:
            # maximum, then copy_: torch.compile refuses out= on a non-contiguous tensor (a transposed parameter's)
            v = state["max_exp_avg_sq"].copy_(torch.maximum(state["max_exp_avg_sq"], v))
        # (m/bias1) / (sqrt(v)/bias2_sqrt + eps), with the scalar factors gathered: one division per element
        bias2_sqrt = hp["bias2_sqrt"]
        return (m * (bias2_sqrt / hp["bias1"]) / (v.sqrt() + hp["eps"] * bias2_sqrt)).to(u.dtype)

    def scalars(self, hp: Hyper, step: Any) -> dict[str, Any]:
        """The bias corrections ``bias1 = 1 - b1^t`` and ``bias2_sqrt = sqrt(1 - b2^t)``."""
        beta1, beta2 = hp["betas"] if torch.is_tensor(step) else (float(b) for b in hp["betas"])
        return {"bias1": 1 - beta1**step, "bias2_sqrt": (1 - beta2**step) ** 0.5}

    def equation(self) -> str:
        amsgrad = "  (AMSGrad: v ← max(v_max, v))" if self.hyper.get("amsgrad") else ""
        return ("m ← β1·m + (1−β1)·u;  v ← β2·v + (1−β2)·u²" + amsgrad + ";  u ← (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε)")


class Lion(Rule):
    name = "lion"
    bounded = True

    def __init__(self, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        super().__init__(betas=betas)

    def state_keys(self, hp: Hyper) -> tuple[str, ...]:
        return ("exp_avg",)

    def validate(self, hp: Hyper) -> None:
        check_betas("betas", hp["betas"])

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        beta1, beta2 = hp["betas"]
        m = state["exp_avg"]
        g = u.to(m.dtype)
        direction = torch.sign(lerp(m, g, 1 - beta1))
        lerp_(m, g, 1 - beta2)
        return direction.to(u.dtype)

    def equation(self) -> str:
        return "u ← sign(β1·m + (1−β1)·u);  m ← β2·m + (1−β2)·u"


def sign() -> Rule:
    """Keep only the direction of each coordinate: ``u <- sign(u)`` (signSGD; Signum after ``ema``)."""
    return Sign()


def softsign(eps: float = 1e-8) -> Rule:
    """The soft version of sign: ``u <- u / (|u| + eps)``, near ``sign(u)`` where ``|u| >> eps``."""
    return Softsign(eps)


def scale_by_adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, amsgrad: bool = False) -> Rule:
    """Adam's scaling of the update, the adaptive variant of softsign momentum.

    ``m <- b1*m + (1-b1)*u``, ``v <- b2*v + (1-b2)*u^2`` (AMSGrad: ``v_max <- max(v_max, v)`` and
    ``v_max`` replaces ``v``), then ``u <- m_hat / (sqrt(v_hat) + eps)`` with the bias corrections
    ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``. Softsign momentum divides ``m`` by
    ``|m|``; Adam divides it by the running root-mean-square of ``u`` instead.
    """
    return ScaleByAdam(betas, eps, amsgrad)


def lion(betas: tuple[float, float] = (0.9, 0.99)) -> Rule:
    """Lion's interpolated sign: ``u <- sign(b1*m + (1-b1)*u)``, then ``m <- b2*m + (1-b2)*u``."""
    return Lion(betas)
