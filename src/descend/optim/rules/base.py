"""Update rules: what one optimizer step computes, one small elementwise transformation at a time.

A step starts from the gradient and passes an *update* ``u`` through a chain of rules; the
parameter then moves by the result, ``w <- weight_factor * w + u`` (``weight_factor = 1 - lr*lambda``
when the chain has decoupled decay, else 1), and projections (if any) are applied to ``w``.
Every rule here is written once, in plain tensor arithmetic, and is executed unchanged by every
engine (the readable per-tensor loop, the multi-tensor engine, the ``torch.compile`` engine).

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


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
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


def _check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        _check_range(f"{name}[{i}]", beta, 0.0, 1.0)


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
        return {k: torch.zeros_like(w, dtype=dtype, memory_format=torch.preserve_format)
                for k in self.state_keys(hp)}

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


# ------------------------------------------------------------------------------------------------
# The rules
# ------------------------------------------------------------------------------------------------


class ScaleByLR(Rule):
    """Scale by the learning rate: ``u <- -lr * u`` (the descent step; ``lr`` is the group's ``lr``)."""

    name = "scale_by_lr"
    lr_step = True
    keeps_bound = True

    def __init__(self) -> None:
        super().__init__()
        self.keys = {"lr": "lr"}

    def validate(self, hp: Hyper) -> None:
        _check_range("lr", hp["lr"], 0.0, math.inf)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return u * -hp["lr"]

    def equation(self) -> str:
        return "u ← −lr·u"


class L2(Rule):
    """L2 regularisation (coupled weight decay): ``u <- u + lambda * w``.

    The gradient of the penalty ``lambda/2 * ||w||^2`` added to the loss's gradient; placed first,
    before momentum or normalisation, it is what torch's ``Adam(weight_decay=...)`` and ``SGD`` do.
    """

    name = "l2"

    def __init__(self, weight_decay: float) -> None:
        super().__init__(weight_decay=weight_decay)

    def validate(self, hp: Hyper) -> None:
        _check_range("weight_decay", hp["weight_decay"], 0.0, math.inf)

    def active(self, hp: Hyper) -> bool:
        return float(hp["weight_decay"]) != 0.0

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return u + w * hp["weight_decay"]

    def equation(self) -> str:
        return "u ← u + λ·w   (L2 penalty λ/2·‖w‖² in the loss)"


class DecoupledDecay(WeightRule):
    """Decoupled weight decay: ``w <- (1 - lr*lambda) * w`` before the update is added (AdamW, Lion).

    It acts on the weights, not on the update, so its place in a chain does not matter; the engines
    fold it into the final ``w <- weight_factor * w + u``. With ``lr_scaled=False`` the decay is
    ``w <- (1 - lambda) * w``, independent of the learning-rate schedule. After a sign-like rule
    (``|u| <= 1``) it bounds the weights: ``||w||_inf <= 1/lambda`` (``lr/lambda`` if not lr-scaled).
    """

    name = "decoupled_decay"
    scales_weights = True

    def __init__(self, weight_decay: float, *, lr_scaled: bool = True) -> None:
        super().__init__(weight_decay=weight_decay)
        self.lr_scaled = lr_scaled

    def validate(self, hp: Hyper) -> None:
        _check_range("weight_decay", hp["weight_decay"], 0.0, math.inf)

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


class EMA(Rule):
    """Momentum as an exponential moving average: ``m <- beta * m + (1 - beta) * u``, ``u <- m``.

    ``m`` starts at zero (no bias correction), so early steps are shorter by ``1 - beta^t``.
    """

    name = "ema"
    keeps_bound = True
    momentum_name = "beta"

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__(beta=beta)

    def state_keys(self, hp: Hyper) -> tuple[str, ...]:
        return ("exp_avg",)

    def validate(self, hp: Hyper) -> None:
        _check_range("beta", hp["beta"], 0.0, 1.0)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        m = state["exp_avg"]
        lerp_(m, u.to(m.dtype), 1 - hp["beta"])
        return m.to(u.dtype)

    def equation(self) -> str:
        return "m ← β·m + (1−β)·u;  u ← m"


class HeavyBall(Rule):
    """Heavy-ball momentum, torch's ``SGD`` form: ``b <- mu * b + (1 - dampening) * u``.

    On the first step ``b <- u`` (as ``torch.optim.SGD``). Then ``u <- b``, or with Nesterov
    ``u <- u + mu * b``.
    """

    name = "heavy_ball"
    static = ("nesterov",)

    def __init__(self, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(momentum=momentum, dampening=dampening, nesterov=nesterov)

    def state_keys(self, hp: Hyper) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def validate(self, hp: Hyper) -> None:
        _check_range("momentum", hp["momentum"], 0.0, 1.0, high_open=False)
        _check_range("dampening", hp["dampening"], 0.0, 1.0, high_open=False)
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


class Sign(Rule):
    """Keep only the direction of each coordinate: ``u <- sign(u)`` (signSGD; Signum after ``ema``)."""

    name = "sign"
    bounded = True

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return torch.sign(u)

    def equation(self) -> str:
        return "u ← sign(u)"


class Softsign(Rule):
    """The soft version of sign: ``u <- u / (|u| + eps)``, near ``sign(u)`` where ``|u| >> eps``."""

    name = "softsign"
    bounded = True

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__(eps=eps)

    def validate(self, hp: Hyper) -> None:
        _check_range("eps", hp["eps"], 0.0, math.inf, low_open=True)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return u / (u.abs() + hp["eps"])

    def equation(self) -> str:
        return "u ← u / (|u| + ε)"


class ScaleByAdam(Rule):
    """Adam's scaling, the adaptive variant of softsign momentum (the formula: :func:`scale_by_adam`)."""

    name = "adam"
    static = ("amsgrad",)

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 amsgrad: bool = False) -> None:
        super().__init__(betas=betas, eps=eps, amsgrad=amsgrad)

    def state_keys(self, hp: Hyper) -> tuple[str, ...]:
        keys = ("exp_avg", "exp_avg_sq")
        return (*keys, "max_exp_avg_sq") if hp["amsgrad"] else keys

    def all_state_keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def validate(self, hp: Hyper) -> None:
        _check_betas("betas", hp["betas"])
        _check_range("eps", hp["eps"], 0.0, math.inf, low_open=True)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        beta1, beta2 = hp["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g = u.to(m.dtype)
        lerp_(m, g, 1 - beta1)
        v.mul_(beta2).add_(g * (1 - beta2) * g)
        if hp["amsgrad"]:
            v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        # (m/bias1) / (sqrt(v)/bias2_sqrt + eps), with the scalar factors gathered: one division per element
        bias2_sqrt = hp["bias2_sqrt"]
        return (m * (bias2_sqrt / hp["bias1"]) / (v.sqrt() + hp["eps"] * bias2_sqrt)).to(u.dtype)

    def scalars(self, hp: Hyper, step: Any) -> dict[str, Any]:
        """The bias corrections ``bias1 = 1 - b1^t`` and ``bias2_sqrt = sqrt(1 - b2^t)``."""
        beta1, beta2 = hp["betas"] if torch.is_tensor(step) else (float(b) for b in hp["betas"])
        return {"bias1": 1 - beta1**step, "bias2_sqrt": (1 - beta2**step) ** 0.5}

    def equation(self) -> str:
        amsgrad = "  (AMSGrad: v ← max(v_max, v))" if self.hyper.get("amsgrad") else ""
        return ("m ← β1·m + (1−β1)·u;  v ← β2·v + (1−β2)·u²" + amsgrad
                + ";  u ← (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε)")


class Lion(Rule):
    """Lion's interpolated sign: ``u_out = sign(b1*m + (1-b1)*u)``, then ``m <- b2*m + (1-b2)*u``."""

    name = "lion"
    bounded = True

    def __init__(self, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        super().__init__(betas=betas)

    def state_keys(self, hp: Hyper) -> tuple[str, ...]:
        return ("exp_avg",)

    def validate(self, hp: Hyper) -> None:
        _check_betas("betas", hp["betas"])

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        beta1, beta2 = hp["betas"]
        m = state["exp_avg"]
        g = u.to(m.dtype)
        direction = torch.sign(lerp(m, g, 1 - beta1))
        lerp_(m, g, 1 - beta2)
        return direction.to(u.dtype)

    def equation(self) -> str:
        return "u ← sign(β1·m + (1−β1)·u);  m ← β2·m + (1−β2)·u"


class ClipByGlobalNorm(Rule):
    """Gradient clipping by global norm: ``u <- u * min(1, max_norm / (||g||_2 + 1e-6))``.

    ``||g||_2`` is the norm over every gradient of the optimizer (all groups), as
    ``torch.nn.utils.clip_grad_norm_``; the engine computes it before the chain runs and passes the
    factor as the hyperparameter ``clip_coef``. Must be the first rule of a chain.
    """

    name = "clip_by_global_norm"
    global_norm = True
    keeps_bound = True

    def __init__(self, max_norm: float = 1.0) -> None:
        super().__init__(max_grad_norm=max_norm)

    def validate(self, hp: Hyper) -> None:
        _check_range("max_grad_norm", hp["max_grad_norm"], 0.0, math.inf, low_open=True)

    def update(self, u: Tensor, w: Tensor, state: State, hp: Hyper, step: Any) -> Tensor:
        return u * hp["clip_coef"]

    def equation(self) -> str:
        return "u ← u · min(1, c / ‖g‖₂)   (‖g‖₂ over all parameters)"


class Projection(WeightRule):
    """Projection onto a constraint set, applied to ``w`` after the step.

    ``box``: ``w <- clamp(w, -r, r)`` (``||w||_inf <= r``); ``ball``: ``w <- w * min(1, r/||w||_2)``
    per parameter tensor. Not an update transformation: :meth:`project_` acts on ``w`` itself so
    the constraint holds exactly, with no rounding from ``w + u``.
    """

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
        _check_range("radius", hp["radius"], 0.0, math.inf, low_open=True)

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


# ------------------------------------------------------------------------------------------------
# Factories: the public, lower-case names a chain is written with
# ------------------------------------------------------------------------------------------------


def scale_by_lr() -> Rule:
    """``u <- -lr * u``. Appended to every chain that does not place it itself."""
    return ScaleByLR()


def l2(weight_decay: float) -> Rule:
    """L2 regularisation (coupled weight decay): ``u <- u + lambda * w``; put it first."""
    return L2(weight_decay)


def decoupled_decay(weight_decay: float, *, lr_scaled: bool = True) -> Rule:
    """Decoupled weight decay ``w <- (1 - lr*lambda)*w`` (``(1 - lambda)*w`` with ``lr_scaled=False``)."""
    return DecoupledDecay(weight_decay, lr_scaled=lr_scaled)


def ema(beta: float = 0.9) -> Rule:
    """EMA momentum ``m <- beta*m + (1-beta)*u``, ``u <- m``."""
    return EMA(beta)


def heavy_ball(momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False) -> Rule:
    """torch.optim.SGD's momentum ``b <- mu*b + (1-dampening)*u`` (Nesterov optional)."""
    return HeavyBall(momentum, dampening, nesterov)


def sign() -> Rule:
    """``u <- sign(u)``."""
    return Sign()


def softsign(eps: float = 1e-8) -> Rule:
    """``u <- u / (|u| + eps)``."""
    return Softsign(eps)


def scale_by_adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                  amsgrad: bool = False) -> Rule:
    """Adam's scaling of the update.

    ``m <- b1*m + (1-b1)*u``, ``v <- b2*v + (1-b2)*u^2`` (AMSGrad: ``v_max <- max(v_max, v)`` and
    ``v_max`` replaces ``v``), then ``u <- m_hat / (sqrt(v_hat) + eps)`` with the bias corrections
    ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``. Softsign momentum divides ``m`` by
    ``|m|``; Adam divides it by the running root-mean-square of ``u`` instead.
    """
    return ScaleByAdam(betas, eps, amsgrad)


def lion(betas: tuple[float, float] = (0.9, 0.99)) -> Rule:
    """Lion's ``sign(b1*m + (1-b1)*u)`` with ``m <- b2*m + (1-b2)*u``."""
    return Lion(betas)


def clip_by_global_norm(max_norm: float = 1.0) -> Rule:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``."""
    return ClipByGlobalNorm(max_norm)


def project_box(radius: float) -> Rule:
    """After the step, ``w <- clamp(w, -radius, radius)``."""
    return Projection("box", radius)


def project_ball(radius: float) -> Rule:
    """After the step, scale each parameter tensor into ``||w||_2 <= radius``."""
    return Projection("ball", radius)
