"""Named optimizers: each one a preset chain of rules with torch-style constructor arguments.

Common keyword-only arguments of every preset:

- ``weight_decay`` and ``decoupled_weight_decay``: L2 regularisation ``u <- g + lambda*w`` placed
  first (coupled, torch's ``Adam``/``SGD``) or decoupled decay ``w <- w - lr*lambda*w`` placed last
  (``AdamW``, Lion). For sign methods decoupled decay bounds the weights: ``||w||_inf <= 1/lambda``.
- ``constraint`` (``"box"`` or ``"ball"``) and ``radius``: project ``w`` after every step.
- ``max_grad_norm``: clip the gradients by their global norm first.
- ``maximize``, ``engine``, ``state_dtype``, ``param_rounding``, ``flat``: see :class:`~descend.optim.ChainOptimizer`.
- ``lr``: each preset's default is its entry of :data:`descend._options.DEFAULT_LR`, the one table the
  command line (``descend optimizers``, ``descend train``) reads too; tuned for an MLP on standardised
  data with minibatches of 32. ``SGD``'s default (0.1) differs from ``torch.optim.SGD``'s (1e-3).
- ``SGD``, ``Adam`` and ``AdamW`` also take torch's ``foreach``, ``fused``, ``capturable`` and
  ``differentiable`` (see :class:`~descend.optim.ChainOptimizer`).
"""

from __future__ import annotations

from typing import Any

import torch

from descend._options import DEFAULT_LR, PRESET_NAMES
from descend.optim._chain import ChainOptimizer, ParamsT
from descend.optim.rules.base import Rule
from descend.optim.rules.descent import Projection, clip_by_global_norm, decoupled_decay, l2
from descend.optim.rules.momentum import ema, heavy_ball
from descend.optim.rules.normalised import lion, scale_by_adam, sign, softsign


class _Preset(ChainOptimizer):
    """A named chain: ``[clip] [L2] core scale_by_lr``, then ``[decoupled decay] [projection]`` on ``w``."""

    def __init__(self, params: ParamsT, core: list[Rule], *, lr: float, weight_decay: float,
                 decoupled_weight_decay: bool, constraint: str | None, radius: float | None,
                 max_grad_norm: float | None, maximize: bool, engine: str,
                 state_dtype: torch.dtype | None, flat: bool, foreach: bool | None = None,
                 param_rounding: str = "stochastic",
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False) -> None:
        rules: list[Rule] = []
        if max_grad_norm is not None:
            rules.append(clip_by_global_norm(max_grad_norm))
        if decoupled_weight_decay:
            rules += [*core, decoupled_decay(weight_decay)]
        else:
            rules += [l2(weight_decay), *core]
        if constraint is not None:
            if radius is None:
                raise ValueError(f"constraint={constraint!r} needs a radius (e.g. radius=1.0)")
            rules.append(Projection(constraint, radius))
        elif radius is not None:
            raise ValueError("radius is set but constraint is None; pass constraint='box' or 'ball'")
        self.decoupled_weight_decay = decoupled_weight_decay
        super().__init__(params, rules, lr=lr, maximize=maximize, engine=engine, state_dtype=state_dtype, flat=flat,
                         param_rounding=param_rounding, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "decoupled_weight_decay": self.decoupled_weight_decay}


def _options(kw: dict[str, Any]) -> dict[str, Any]:
    names = ("lr", "weight_decay", "decoupled_weight_decay", "constraint", "radius", "max_grad_norm", "maximize",
             "engine", "state_dtype", "param_rounding", "flat", "foreach", "fused", "capturable", "differentiable")
    return {k: kw[k] for k in names if k in kw}


class SGD(_Preset):
    """Stochastic gradient descent, a drop-in for ``torch.optim.SGD``: the chain ``l2, heavy_ball, scale_by_lr``
    (formulas: :func:`~descend.optim.l2`, :func:`~descend.optim.heavy_ball`). Full-batch gradient descent is
    this optimizer fed the gradient of the whole training set.
    """

    def __init__(self, params: ParamsT, lr: float = DEFAULT_LR["sgd"], momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False, constraint: str | None = None,
                 radius: float | None = None, max_grad_norm: float | None = None, engine: str = "auto",
                 state_dtype: torch.dtype | None = None, flat: bool = False, foreach: bool | None = None,
                 param_rounding: str = "stochastic",
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False) -> None:
        super().__init__(params, [heavy_ball(momentum, dampening, nesterov)], **_options(locals()))


class Momentum(_Preset):
    """Momentum as an exponential moving average (:func:`~descend.optim.ema`), then ``scale_by_lr``.

    Same direction as heavy-ball momentum with ``lr_heavy = lr*(1-beta)``.
    """

    def __init__(self, params: ParamsT, lr: float = DEFAULT_LR["momentum"], beta: float = 0.9,
                 weight_decay: float = 0.0, *, maximize: bool = False, decoupled_weight_decay: bool = False,
                 constraint: str | None = None, radius: float | None = None, max_grad_norm: float | None = None,
                 engine: str = "auto", state_dtype: torch.dtype | None = None, flat: bool = False,
                 param_rounding: str = "stochastic") -> None:
        super().__init__(params, [ema(beta)], **_options(locals()))


class SignSGD(_Preset):
    """signSGD: the chain ``sign, scale_by_lr`` (decoupled decay by default: ``||w||_inf <= 1/lambda``)."""

    def __init__(self, params: ParamsT, lr: float = DEFAULT_LR["signsgd"], weight_decay: float = 0.0, *,
                 maximize: bool = False, decoupled_weight_decay: bool = True, constraint: str | None = None,
                 radius: float | None = None, max_grad_norm: float | None = None, engine: str = "auto",
                 state_dtype: torch.dtype | None = None, flat: bool = False,
                 param_rounding: str = "stochastic") -> None:
        super().__init__(params, [sign()], **_options(locals()))


class Signum(_Preset):
    """Signum, the sign of EMA momentum: the chain ``ema, sign, scale_by_lr``."""

    def __init__(self, params: ParamsT, lr: float = DEFAULT_LR["signum"], beta: float = 0.9,
                 weight_decay: float = 0.0, *, maximize: bool = False, decoupled_weight_decay: bool = True,
                 constraint: str | None = None, radius: float | None = None, max_grad_norm: float | None = None,
                 engine: str = "auto", state_dtype: torch.dtype | None = None, flat: bool = False,
                 param_rounding: str = "stochastic") -> None:
        super().__init__(params, [ema(beta), sign()], **_options(locals()))


class Softsign(_Preset):
    """Softsign momentum, the soft version of Signum: the chain ``ema, softsign, scale_by_lr``.

    Adam (:func:`~descend.optim.scale_by_adam`) replaces ``|m|`` by ``sqrt(v)``, the running RMS of ``g``.
    ``eps`` sets the gradient scale below which steps shrink (default ``1e-8``: nearly Signum).
    """

    def __init__(self, params: ParamsT, lr: float = DEFAULT_LR["softsign"], beta: float = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, maximize: bool = False, decoupled_weight_decay: bool = True,
                 constraint: str | None = None, radius: float | None = None, max_grad_norm: float | None = None,
                 engine: str = "auto", state_dtype: torch.dtype | None = None, flat: bool = False,
                 param_rounding: str = "stochastic") -> None:
        super().__init__(params, [ema(beta), softsign(eps)], **_options(locals()))


class Lion(_Preset):
    """Lion: the chain ``lion, scale_by_lr, decoupled_decay`` (formula: :func:`~descend.optim.lion`)."""

    def __init__(self, params: ParamsT, lr: float = DEFAULT_LR["lion"], betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, decoupled_weight_decay: bool = True,
                 constraint: str | None = None, radius: float | None = None, max_grad_norm: float | None = None,
                 engine: str = "auto", state_dtype: torch.dtype | None = None, flat: bool = False,
                 param_rounding: str = "stochastic") -> None:
        super().__init__(params, [lion(betas)], **_options(locals()))


class Adam(_Preset):
    """Adam, a drop-in for ``torch.optim.Adam``: the chain ``l2, scale_by_adam, scale_by_lr`` (weight decay
    coupled into the gradient by default; formula: :func:`~descend.optim.scale_by_adam`)."""

    def __init__(self, params: ParamsT, lr: float = DEFAULT_LR["adam"], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False, constraint: str | None = None,
                 radius: float | None = None, max_grad_norm: float | None = None, engine: str = "auto",
                 state_dtype: torch.dtype | None = None, flat: bool = False, foreach: bool | None = None,
                 param_rounding: str = "stochastic",
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False) -> None:
        super().__init__(params, [scale_by_adam(betas, eps, amsgrad)], **_options(locals()))


class AdamW(_Preset):
    """AdamW, a drop-in for ``torch.optim.AdamW``: :class:`Adam` with decoupled decay
    (:func:`~descend.optim.decoupled_decay`)."""

    def __init__(self, params: ParamsT, lr: float = DEFAULT_LR["adamw"], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = True, constraint: str | None = None,
                 radius: float | None = None, max_grad_norm: float | None = None, engine: str = "auto",
                 state_dtype: torch.dtype | None = None, flat: bool = False, foreach: bool | None = None,
                 param_rounding: str = "stochastic",
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False) -> None:
        super().__init__(params, [scale_by_adam(betas, eps, amsgrad)], **_options(locals()))


#: Lower-case name -> optimizer class, for configuration files and the command line; the names are those of
#: the torch-free table the help reads (:data:`descend._options.PRESET_NAMES`), in its order.
OPTIMIZERS: dict[str, type[ChainOptimizer]] = dict(
    zip(PRESET_NAMES, (SGD, Momentum, SignSGD, Signum, Softsign, Lion, Adam, AdamW), strict=True)
)


def create(name: str, params: ParamsT, **kwargs: Any) -> ChainOptimizer:
    """``OPTIMIZERS[name](params, **kwargs)`` with a clear error for an unknown name."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(params, **kwargs)
