"""Linear models, MLPs and residual MLPs, with the knobs that decide whether gradients flow.

Every network here maps ``x [B, in_features] -> y [B, out_features]`` and keeps its hidden layers
in ``self.blocks`` (an ``nn.ModuleList``, input side first) and its output layer in ``self.head``,
so :func:`descend.diagnostics.gradient_flow` and :func:`descend.diagnostics.layer_gains` read them
in order.
"""

from __future__ import annotations

import itertools
import math
import warnings

from torch import Tensor, nn

from descend._options import ACTIVATIONS
from descend.nn._checkpoint import run_block

INITS = ("default", "xavier", "he")
NORMS = ("layer", "batch", None)

InitSpec = str | float


def _choice_error(argument: str, value: object, allowed: tuple[object, ...]) -> ValueError:
    return ValueError(f"{argument}={value!r} is not supported; expected one of {allowed}")


def make_activation(name: str) -> nn.Module:
    """The activation module called ``name`` (``relu | sigmoid | tanh | gelu``)."""
    table = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU}
    if name not in table:
        raise _choice_error("activation", name, ACTIVATIONS)
    return table[name]()


def make_norm(name: str | None, features: int) -> nn.Module:
    """``nn.LayerNorm`` for ``"layer"``, ``nn.BatchNorm1d`` for ``"batch"``, identity for ``None``."""
    if name is None:
        return nn.Identity()
    if name == "layer":
        return nn.LayerNorm(features)
    if name == "batch":
        return nn.BatchNorm1d(features)
    raise _choice_error("norm", name, NORMS)


def _check_init(init: InitSpec) -> None:
    if isinstance(init, bool) or not isinstance(init, (str, int, float)):
        raise ValueError(f"init={init!r} is not supported; expected one of {INITS} or a positive float gain")
    if isinstance(init, str) and init not in INITS:
        raise _choice_error("init", init, (*INITS, "<float gain>"))
    if isinstance(init, (int, float)) and not (math.isfinite(init) and init > 0):
        raise ValueError(f"init={init!r}: a float gain must be finite and > 0")


def init_linear(layer: nn.Linear, init: InitSpec, activation: str = "relu") -> None:
    """Re-initialise ``layer`` in place.

    With ``fan_in = layer.in_features``:

    - ``"default"``: PyTorch's own ``nn.Linear`` init, ``W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
      so ``std(W) = 1/sqrt(3 fan_in)``: each layer shrinks the signal variance by about 3 (times the
      activation's own loss), which is why deep plain nets with it lose their signal.
    - ``"xavier"``: ``W ~ N(0, g^2 * 2/(fan_in + fan_out))`` with ``g`` the activation gain
      (``torch.nn.init.calculate_gain``; GELU uses ReLU's), ``b = 0``.
    - ``"he"``: ``W ~ N(0, 2/fan_in)``, ``b = 0``: preserves ``E[h^2]`` through ReLU layers.
    - a float ``g``: ``W ~ N(0, g^2/fan_in)``, ``b = 0``.
    """
    _check_init(init)
    if init == "default":
        layer.reset_parameters()
        return
    if init == "xavier":
        gain = nn.init.calculate_gain("relu" if activation == "gelu" else activation)
        nn.init.xavier_normal_(layer.weight, gain=gain)
    elif init == "he":
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    else:
        nn.init.normal_(layer.weight, std=float(init) / math.sqrt(layer.in_features))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class Linear(nn.Linear):
    """An affine map ``y = x W^T + b``: ``[B, in_features] -> [B, out_features]``.

    The linear model of descend: with a mean-squared-error loss it is linear regression, with
    cross-entropy over ``out_features`` logits it is softmax (``out_features = 2``: logistic)
    regression. Identical to ``torch.nn.Linear``; ``init`` picks the initialisation (see
    :func:`init_linear`), ``"default"`` being PyTorch's.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: InitSpec = "default") -> None:
        _check_init(init)
        super().__init__(in_features, out_features, bias=bias)
        init_linear(self, init, activation="relu")


class MLPBlock(nn.Module):
    """One hidden layer ``h -> act(norm(h W^T + b))``: ``[B, in] -> [B, out]``."""

    def __init__(self, in_features: int, out_features: int, activation: str, norm: str | None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.norm = make_norm(norm, out_features)
        self.act = make_activation(activation)

    def forward(self, h: Tensor) -> Tensor:
        return self.act(self.norm(self.linear(h)))


class MLP(nn.Module):
    """A plain multi-layer perceptron: ``depth`` hidden layers of ``width`` units, then a linear head.

    ``x [B, in_features] -> h_1 -> ... -> h_depth -> y [B, out_features]`` with
    ``h_l = act(norm(W_l h_{l-1} + b_l))`` and ``y = W_out h_depth + b_out``; ``depth = 0`` is a
    linear model. ``init`` is ``"default" | "xavier" | "he"`` or a float gain (see :func:`init_linear`),
    applied to every layer; ``norm`` is ``"layer" | "batch" | None``. ``width`` is the name used by
    :class:`ResidualMLP` and ``--width`` too; ``hidden=`` is its deprecated alias.
    """

    def __init__(self, in_features: int, out_features: int, width: int = 64, depth: int = 2, activation: str = "relu",
                 init: InitSpec = "default", norm: str | None = None, *, hidden: int | None = None) -> None:
        super().__init__()
        if hidden is not None:
            warnings.warn("MLP(hidden=) is deprecated; use MLP(width=)", DeprecationWarning, stacklevel=2)
            width = hidden
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        _check_positive("width", width)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth={depth!r}: expected an integer >= 0 (the number of hidden layers)")
        make_activation(activation)
        make_norm(norm, 1)
        _check_init(init)
        widths = [in_features] + [width] * depth
        self.blocks = nn.ModuleList(MLPBlock(a, b, activation, norm) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], out_features)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module, init, activation)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ResidualBlock(nn.Module):
    """``x -> x + s * (W act(norm(x)) + b)`` (``residual=True``) or ``x -> W act(norm(x)) + b``.

    Shapes ``[B, width] -> [B, width]``. The branch is pre-norm and pre-activation (normalise, then
    activate, then the affine map), so the residual stream itself is never squashed by the
    activation. With ``residual=False`` the block is one layer of a plain (pre-normalised) MLP with
    the same parameters as the residual one.
    """

    def __init__(self, width: int, activation: str, norm: str | None, residual: bool, branch_scale: float) -> None:
        super().__init__()
        self.norm = make_norm(norm, width)
        self.linear = nn.Linear(width, width)
        self.act = make_activation(activation)
        self.residual = residual
        self.branch_scale = branch_scale

    def forward(self, x: Tensor) -> Tensor:
        branch = self.linear(self.act(self.norm(x)))
        return x + self.branch_scale * branch if self.residual else branch


class ResidualMLP(nn.Module):
    """A deep MLP made of pre-norm residual blocks.

    ``x [B, in_features] -> z_0 = W_in x + b_in -> z_l = z_{l-1} + s * (W_l act(norm(z_{l-1})) + b_l)
    (l = 1..depth) -> y = W_out norm(z_depth) + b_out [B, out_features]``.

    ``branch_scale`` ``s`` defaults to 1 (the usual pre-norm block); ``s = 1/sqrt(depth)`` keeps
    ``Var(z_depth)`` of the order of ``Var(z_0)`` however deep, so very deep stacks stay within a
    small factor layer to layer (the gradient of ``W_l`` carries the factor ``s``).
    ``residual=False`` drops the ``z_{l-1} +`` skip (and ``s``), leaving the plain deep network with
    exactly the same parameters, for a one-for-one comparison. ``norm=None`` (with ``s = 1``) is the
    bare ``z + f(z)`` residual, whose activations grow geometrically with depth.
    Hidden layers are in ``self.blocks``; ``self.stem`` and ``self.head`` are the in/out projections.
    ``checkpoint=True`` recomputes each block's activations in the backward pass instead of storing them
    (:mod:`descend.nn._checkpoint`; not with ``norm="batch"``, whose running statistics would be updated twice).
    """

    def __init__(self, in_features: int, out_features: int, width: int = 64, depth: int = 8, activation: str = "relu",
                 residual: bool = True, norm: str | None = "layer", branch_scale: float = 1.0, init: InitSpec = "he",
                 checkpoint: bool = False) -> None:
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        _check_positive("width", width)
        _check_positive("depth", depth)
        make_activation(activation)
        make_norm(norm, 1)
        _check_init(init)
        if not (isinstance(branch_scale, (int, float)) and math.isfinite(branch_scale) and branch_scale > 0):
            raise ValueError(f"branch_scale={branch_scale!r}: expected a finite number > 0")
        if checkpoint and norm == "batch":
            raise ValueError("checkpoint=True cannot recompute batch norm (its running statistics would update twice)")
        self.branch_scale, self.checkpoint = float(branch_scale), checkpoint
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            ResidualBlock(width, activation, norm, residual, self.branch_scale) for _ in range(depth)
        )
        self.final_norm = make_norm(norm, width)
        self.head = nn.Linear(width, out_features)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module, init, activation)

    def forward(self, x: Tensor) -> Tensor:
        z = self.stem(x)
        for block in self.blocks:
            z = run_block(block, z, recompute=self.checkpoint)
        return self.head(self.final_norm(z))


def _check_positive(argument: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument}={value!r}: expected a positive integer")


def count_parameters(model: nn.Module) -> int:
    """The number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MLP",
    "NORMS",
    "Linear",
    "MLPBlock",
    "ResidualBlock",
    "ResidualMLP",
    "count_parameters",
    "init_linear",
    "make_activation",
    "make_norm",
]
