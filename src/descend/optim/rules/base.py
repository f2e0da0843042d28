"""The rule base class and its contract, and the helpers rules share.

The contract of :meth:`Rule.update`:

- ``u``, ``w`` and every state tensor have the same shape (a parameter, or any flat buffer holding
  many parameters: the rules are elementwise, so they cannot tell the difference);
- ``u`` is never modified in place (it may be the parameter's ``.grad``); state tensors are
  modified in place (they persist between steps);
- hyperparameters come as Python numbers or 0-d tensors (tensors let a compiled step follow an LR
  schedule without recompiling), so only arithmetic operators and ``torch`` functions that accept
  both are used;
- ``step`` is the 1-based index of the step being taken (a number or a 0-d tensor);
- values that depend only on hyperparameters and ``step`` (Adam's bias corrections) come from
  :meth:`Rule.scalars`, which every engine calls once per step and bucket and merges into ``hp``, so
  no engine evaluates them per element.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

Hyper = Mapping[str, Any]
State = dict[str, Tensor]


def step_dtype() -> torch.dtype:
    """The dtype torch.optim uses for the ``step`` counter."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def lerp(start: Tensor, end: Tensor, weight: Any) -> Tensor:
    """``start + weight * (end - start)`` (``torch.lerp``), the same whether ``weight`` is a number or a 0-d tensor.

    For half-precision tensors torch computes a number weight in float32 and rounds the result once,
    but first rounds a tensor weight to the tensors' dtype; here a tensor weight is applied as a number would be.
    """
    if isinstance(start, Tensor) and isinstance(weight, Tensor) and start.dtype in (torch.bfloat16, torch.float16):
        return torch.lerp(start.float(), end.float(), weight.float()).to(start.dtype)
    return torch.lerp(start, end, weight)


def lerp_(start: Tensor, end: Tensor, weight: Any) -> Tensor:
    """:func:`lerp` in place of ``start``."""
    if isinstance(start, Tensor) and isinstance(weight, Tensor) and start.dtype in (torch.bfloat16, torch.float16):
        return start.copy_(lerp(start, end, weight))
    return start.lerp_(end, weight)


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = True) -> None:
    """Raise ``ValueError`` unless ``low <= value < high`` (brackets as given)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")


def check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_range(f"{name}[{i}]", beta, 0.0, 1.0)


class Rule:
    """One elementwise transformation of the update, with its own per-parameter state.

    Subclasses set :attr:`name`, :attr:`hyper` (hyperparameter name -> default; these live in the
    optimizer's param groups, so they can differ per group and be scheduled), :meth:`state_keys`,
    :meth:`update` and :meth:`equation`.
    """

    name: ClassVar[str] = "rule"
    #: Output bounded by 1 per coordinate (sign-like); decoupled decay then implies ``|w| <= 1/lambda``.
    bounded: ClassVar[bool] = False
    #: Keeps a bound of 1 per coordinate on ``u`` if ``u`` had one (averaging, scaling down).
    keeps_bound: ClassVar[bool] = False
    #: The descent step ``u <- -lr * u``: a chain has it once (appended where absent).
    lr_step: ClassVar[bool] = False
    #: Reads the global gradient norm (the hyperparameter ``clip_coef``): must come first in a chain.
    global_norm: ClassVar[bool] = False
    #: Hyperparameters that change the computation's structure (flags); engines specialise on them.
    static: ClassVar[tuple[str, ...]] = ()
    #: The hyperparameter that is a momentum coefficient under another name (``ema``'s ``beta``); a chain
    #: with no ``momentum`` or ``betas`` of its own lets torch's momentum-cycling schedulers set it as ``momentum``.
    momentum_name: ClassVar[str | None] = None
    #: The state tensors (by the rule's own names) that are never negative: each starts at 0 and
    #: :meth:`update` maps a state ``s >= 0`` to a new ``s >= 0`` whatever ``u`` is (Adam's
    #: ``v <- b2*v + (1-b2)*u^2`` and ``max(v_max, v)``). A store may keep them in an unsigned code (8-bit
    #: state: twice the resolution of a signed one), which stores a negative value as 0.
    nonnegative_state: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **hyper: Any) -> None:
        self.hyper: dict[str, Any] = dict(hyper)
        #: hyperparameter name -> param-group key (renamed by ``chain`` when two rules share a name).
        self.keys: dict[str, str] = {name: name for name in hyper}
        #: state name -> key in the optimizer state (renamed when two rules share a state name).
        self.state_names: dict[str, str] = {}

    # -- what a subclass provides -------------------------------------------------------------
    def state_keys(self, hp: Hyper) -> tuple[str, ...]:
        """Names of the per-parameter state tensors this rule keeps (may depend on ``hp``)."""
        return ()

    def all_state_keys(self) -> tuple[str, ...]:
        """Every state name this rule can keep, whatever its hyperparameters (``chain`` names them all)."""
        return self.state_keys(self.hyper)

    def validate(self, hp: Hyper) -> None:
        """Raise ``ValueError`` naming the hyperparameter and its allowed range."""

    def init_state(self, w: Tensor, hp: Hyper, dtype: torch.dtype | None = None) -> State:
        """Fresh state: zeros shaped like ``w`` (in ``dtype`` if given) for every state key."""
        return {k: torch.zeros_like(w, dtype=dtype, memory_format=torch.preserve_format) for k in self.state_keys(hp)}

    def active(self, hp: Hyper) -> bool:
        """False when these hyperparameters make the rule the identity (it is then skipped, stateless)."""
        return True

    def scalars(self, hp: Hyper, step: Any) -> dict[str, Any]:
        """Per-step scalars derived from ``hp`` and ``step`` (a Python int), merged into ``hp`` for :meth:`update`.

        In a step traced by ``torch.compile``, ``step`` is a 0-d float64 tensor and the numbers in ``hp``
        are 0-d float64 tensors too; the scalars are then tensors.

        Engines call this once per step (and bucket) with Python numbers, outside the elementwise
        work, so a compiled step receives the results as inputs instead of recomputing them per element.
        """
        return {}

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        raise NotImplementedError

    def first_update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        """The update on the step that created this rule's state (default: :meth:`update`)."""
        return self.update(u, w, state, hp, step)

    def equation(self) -> str:
        """The rule as an equation, in the notation of :func:`descend.optim.explain`."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    def read(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """This rule's hyperparameters, by their own names, from a param group."""
        return {name: group[key] for name, key in self.keys.items()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{self.name}({args})"


class WeightRule(Rule):
    """A rule that acts on the weights rather than on the update: ``w <- weight_factor * w + u``, then
    ``project_(w)``.

    Subclasses provide :meth:`weight_factor` (the factor the weights are multiplied by before the update
    is added: decoupled decay) and/or :meth:`project_` (applied to ``w`` after the step: projections),
    and :meth:`radius` (the ``||w||_inf`` bound they imply). Engines never call :meth:`update`.
    """

    #: :meth:`weight_factor` is not 1 (decoupled decay): engines fold it into the step.
    scales_weights: ClassVar[bool] = False
    #: :meth:`project_` acts after the step.
    projects: ClassVar[bool] = False
    #: ``project_`` treats every element alone (a box), so it may act on any flat view of ``w``.
    elementwise: ClassVar[bool] = True

    def weight_factor(self, hp: Hyper, lr: Any) -> Any:
        """The factor the weights are multiplied by on this step, before ``u`` is added."""
        return 1

    def project_(self, w: Tensor, hp: Hyper) -> None:
        """Act on the updated weights in place (default: nothing)."""

    def radius(self, hp: Hyper, lr: float, bounded: bool) -> float | None:
        """The ``||w||_inf`` bound this rule implies, given whether the update is bounded by 1 per coordinate."""
        return None

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        raise TypeError(f"{self.name} acts on the weights: engines apply weight_factor() and project_()")

