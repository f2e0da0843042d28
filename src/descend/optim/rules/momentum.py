"""Momentum: an exponential moving average of the update, and torch's heavy ball."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from descend.optim.rules.base import Hyper, Rule, State, check_range, lerp_


class EMA(Rule):
    name = "ema"
    keeps_bound = True
    momentum_name = "beta"

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__(beta=beta)

    def state_keys(self, hp: Hyper) -> tuple[str, ...]:
        return ("exp_avg",)

    def validate(self, hp: Hyper) -> None:
        check_range("beta", hp["beta"], 0.0, 1.0)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        m = state["exp_avg"]
        lerp_(m, u.to(m.dtype), 1 - hp["beta"])
        return m.to(u.dtype)

    def equation(self) -> str:
        return "m ← β·m + (1−β)·u;  u ← m"


class HeavyBall(Rule):
    name = "heavy_ball"
    static = ("nesterov",)

    def __init__(self, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(momentum=momentum, dampening=dampening, nesterov=nesterov)

    def state_keys(self, hp: Hyper) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def validate(self, hp: Hyper) -> None:
        check_range("momentum", hp["momentum"], 0.0, 1.0, high_open=False)
        check_range("dampening", hp["dampening"], 0.0, 1.0, high_open=False)
        if hp["nesterov"] and (float(hp["momentum"]) <= 0 or float(hp["dampening"]) != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")

    def active(self, hp: Hyper) -> bool:
        return float(hp["momentum"]) != 0.0

    def _out(self, u: Tensor, b: Tensor, hp: Hyper) -> Tensor:
        b = b.to(u.dtype)
        return u + b * hp["momentum"] if hp["nesterov"] else b

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        b = state["momentum_buffer"]
        b.mul_(hp["momentum"]).add_(u.to(b.dtype) * (1 - hp["dampening"]))
        return self._out(u, b, hp)

    def first_update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        b = state["momentum_buffer"]
        b.copy_(u)
        return self._out(u, b, hp)

    def equation(self) -> str:
        return "b ← μ·b + (1−d)·u  (b ← u on step 1);  u ← b  (Nesterov: u ← u + μ·b)"


def ema(beta: float = 0.9) -> Rule:
    """Momentum as an exponential moving average: ``m <- beta * m + (1 - beta) * u``, ``u <- m``.

    ``m`` starts at zero (no bias correction), so early steps are shorter by ``1 - beta^t``.
    """
    return EMA(beta)


def heavy_ball(momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False) -> Rule:
    """Heavy-ball momentum, torch's ``SGD`` form: ``b <- mu * b + (1 - dampening) * u``.

    On the first step ``b <- u`` (as ``torch.optim.SGD``). Then ``u <- b``, or with Nesterov ``u <- u + mu * b``.
    """
    return HeavyBall(momentum, dampening, nesterov)
