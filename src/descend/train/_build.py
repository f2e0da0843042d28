"""Build the model and optimizer a run names, and check that they fit the data.

Models: ``linear``, ``mlp``, ``resmlp`` (vector inputs) and ``pointset`` (point sets: a
:class:`~descend.nn.PointSetTransformer`, or a :class:`~descend.nn.PointSetDecoder` for query
tasks), ``transformer`` (token sequences: a causal :class:`~descend.nn.TransformerLM`).
Optimizers: ``gd`` (full-batch gradient descent: SGD fed the whole-set gradient) and every
name in :data:`descend.optim.OPTIMIZERS`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from descend import optim
from descend._options import DEFAULT_LR, FULL_BATCH, MODELS, OPTIMIZER_NAMES, OPTIONS, check
from descend.data._base import DataBundle
from descend.nn import check_model_size, parameter_estimate, physical_memory

# The names and default learning rates live in the torch-free options module (one table each).
__all__ = [
    "DEFAULT_LR", "FULL_BATCH", "MODELS", "OPTIMIZER_NAMES", "MemoryPlan", "build_model", "make_optimizer",
    "memory_plan", "optimizer_class", "state_bytes_per_parameter",
]


def build_model(name: str, data: DataBundle, *, depth: int = OPTIONS["depth"].default,
                width: int = OPTIONS["width"].default, activation: str = OPTIONS["activation"].default,
                heads: int = OPTIONS["heads"].default, checkpoint_activations: bool = False,
                bytes_per_parameter: float = 16) -> nn.Module:
    """The model ``name`` shaped for ``data`` (inputs, outputs); ``ValueError`` if it cannot fit it.

    The model's size is checked before anything is allocated (see
    :func:`~descend.nn.check_model_size`, with ``bytes_per_parameter`` of training state): a
    request beyond the machine's memory is an error.
    """
    from descend import nn as dnn

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    check("depth", depth)
    check("width", width)
    if checkpoint_activations and name not in ("resmlp", "transformer"):
        raise ValueError(f"--checkpoint-activations recomputes resmlp and transformer blocks; model {name!r} has none")
    vector = data.input_kind == "vector"
    inputs = data.in_features if vector else (data.location_dim or 0) + (data.value_dim or 0)
    check_model_size(name, depth, width, inputs or 0, data.out_features, physical_memory(), bytes_per_parameter)
    if name == "transformer" or data.input_kind == "tokens":
        if name != "transformer":
            raise ValueError(f"{data.name!r} holds token sequences; use --model transformer")
        if data.input_kind != "tokens":
            raise ValueError(f"model 'transformer' needs token sequences (e.g. --data stdlib-text), not {data.name!r}")
        context = int(data.info["context"])  # type: ignore[call-overload]
        return dnn.TransformerLM(
            data.out_features, context, width=width, depth=depth, heads=heads, checkpoint=checkpoint_activations
        )
    if name == "pointset":
        if vector:
            raise ValueError(
                f"model 'pointset' needs point-set data, but {data.name!r} is tabular; "
                "use --model linear, mlp or resmlp"
            )
        assert data.location_dim is not None and data.value_dim is not None
        cls = dnn.PointSetDecoder if data.input_kind == "pointset-query" else dnn.PointSetTransformer
        return cls(data.location_dim, data.value_dim, data.out_features, width=width, depth=depth, heads=heads)
    if not vector:
        raise ValueError(
            f"model {name!r} needs tabular (vector) inputs, but {data.name!r} is a point-set dataset; "
            "use --model pointset"
        )
    assert data.in_features is not None
    if name == "linear":
        return dnn.Linear(data.in_features, data.out_features)
    if name == "mlp":
        return dnn.MLP(data.in_features, data.out_features, width=width, depth=depth, activation=activation)
    return dnn.ResidualMLP(
        data.in_features, data.out_features, width=width, depth=depth, activation=activation,
        checkpoint=checkpoint_activations,
    )


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class behind ``name`` (``gd`` is SGD)."""
    key = name.lower()
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    return optim.OPTIMIZERS["sgd" if key == "gd" else key]


def resolved_weight_decay(name: str, weight_decay: float | None) -> float:
    """``weight_decay``, or (``None``) the default of the optimizer class behind ``name``."""
    if weight_decay is not None:
        return weight_decay
    return float(inspect.signature(optimizer_class(name)).parameters["weight_decay"].default)


def make_optimizer(name: str, params: Any, *, lr: float | None = None, weight_decay: float | None = None,
                   **kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_class(name)(params, lr=..., weight_decay=..., **kwargs)``.

    ``lr=None`` takes :data:`~descend._options.DEFAULT_LR` (the one table of per-optimizer defaults);
    ``weight_decay=None`` the class default. Both are checked by the ``lr`` / ``weight_decay`` options'
    one validation (finite, ``lr > 0``, ``weight_decay >= 0``). Options the class does not take
    (e.g. ``betas`` for SGD) are an error naming the options it does take.
    """
    cls = optimizer_class(name)
    lr = check("lr", DEFAULT_LR[name.lower()] if lr is None else lr)
    if weight_decay is not None:
        kwargs["weight_decay"] = check("weight_decay", weight_decay)
    accepted = inspect.signature(cls).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"optimizer {name!r} takes no option {unknown[0]!r}; it takes {', '.join(accepted)}")
    return cls(params, lr=lr, **kwargs)


def state_bytes_per_parameter(name: str, **options: Any) -> float:
    """Bytes of optimizer state per parameter for optimizer ``name`` built with ``options`` (counted on a
    parameter of 256 elements after one step: every state tensor the step keeps, at its dtype; 8-bit state
    ``1 + 4/256`` per state tensor, its codes and a scale per 256 values)."""
    n = 256
    p = torch.zeros(n, requires_grad=True)
    p.grad = torch.zeros(n)
    opt = make_optimizer(name, [p], engine="reference", **options)  # no kernel to build for a count
    opt.step()
    return sum(t.nbytes for k, t in opt.state[p].items() if k != "step" and torch.is_tensor(t)) / n


def state_options(spec: Any) -> dict[str, Any]:
    """The ``state_dtype`` keyword of a run's optimizer: given whenever the state is not kept in the parameters'
    own dtype (bfloat16 parameters keep float32 state unless ``--state-dtype`` says otherwise)."""
    keep_own = spec.state_dtype == "float32" and spec.param_dtype != "bfloat16"
    return {} if keep_own else {"state_dtype": spec.state_dtype}


@dataclass(frozen=True)
class MemoryPlan:
    """What a training run holds in memory beside the data, worked out before anything is allocated (bytes).

    ``weights``: 4 per parameter (float32), 2 with ``param_dtype="bfloat16"``; ``gradients``: as many per
    parameter, or the largest tensor's when the step runs inside the backward pass; ``optimizer_state``:
    per parameter, what the optimizer keeps (:func:`state_bytes_per_parameter`); ``activations``: an
    estimate of what one step's forward pass stores for backward.
    """

    parameters: int
    weights: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations

    @property
    def bytes_per_parameter(self) -> float:
        """Weights, gradients and optimizer state per parameter (activations excluded)."""
        return (self.weights + self.gradients + self.optimizer_state) / max(1, self.parameters)

    def describe(self, memory: int | None = None) -> str:
        def size(n: float) -> str:
            for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
                if n >= scale:
                    return f"{n / scale:.3g} {unit}"
            return f"{n:.0f} B"

        of = f" of this machine's {size(memory)}" if memory else ""
        return (f"memory plan: {self.parameters:,} parameters: weights {size(self.weights)}, gradients "
                f"{size(self.gradients)}, optimizer state {size(self.optimizer_state)}, activations about "
                f"{size(self.activations)}; {size(self.total)}{of}")


def memory_plan(spec: Any, data: DataBundle) -> MemoryPlan:
    """The :class:`MemoryPlan` of training ``spec`` (a :class:`~descend._options.RunSpec`) on ``data``."""
    vector = data.input_kind == "vector"
    inputs = (data.in_features if vector else (data.location_dim or 0) + (data.value_dim or 0)) or 0
    n = parameter_estimate(spec.model, spec.depth, spec.width, inputs, data.out_features)
    width, depth = spec.width, max(1, spec.depth)
    size = 2 if spec.param_dtype == "bfloat16" else 4  # bytes of a parameter, and of its gradient
    if spec.step_in_backward:  # one gradient at a time: the largest tensor's
        block = (4 if spec.model in ("transformer", "pointset") else 1) * (width + 1) * width
        gradients = size * max(block, (inputs + 1) * width, (width + 1) * data.out_features)
    else:
        gradients = size * n
    state = int(n * state_bytes_per_parameter(spec.optimizer, lr=spec.lr, weight_decay=spec.weight_decay,
                                              **state_options(spec)))
    rows = spec.batch_size or spec.chunk_size or len(data.train)  # type: ignore[arg-type]
    tokens = int(data.info.get("context", 1)) if data.input_kind == "tokens" else 1
    if spec.model == "transformer":  # per token and block: q, k, v, attention out, 4x MLP in and out, 2 norms
        per_row = tokens * (depth * 14 * width + 2 * data.out_features) + depth * 4 * tokens * tokens
    else:
        per_row = depth * 3 * width + width + data.out_features
    activations = 4 * rows * per_row // (depth if spec.checkpoint_activations else 1)
    return MemoryPlan(n, size * n, gradients, state, activations)
