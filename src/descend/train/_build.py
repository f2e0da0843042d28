"""Build the model and optimizer a run names, and check that they fit the data.

Models: ``linear``, ``mlp``, ``resmlp`` (vector inputs) and ``pointset`` (point sets: a
:class:`~descend.nn.PointSetTransformer`, or a :class:`~descend.nn.PointSetDecoder` for query
tasks), ``transformer`` (token sequences: a causal :class:`~descend.nn.TransformerLM`).
Optimizers: ``gd`` (full-batch gradient descent: SGD fed the whole-set gradient) and every
name in :data:`descend.optim.OPTIMIZERS`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from descend import optim
from descend._options import (
    DEFAULT_LR,
    FULL_BATCH,
    MODELS,
    OPTIMIZER_NAMES,
    OPTIONS,
    check,
    check_model_size,
    physical_memory,
)
from descend.data._base import DataBundle

# The names and default learning rates live in the torch-free options module (one table each).
__all__ = ["DEFAULT_LR", "FULL_BATCH", "MODELS", "OPTIMIZER_NAMES", "build_model", "make_optimizer", "optimizer_class"]


def build_model(
    name: str, data: DataBundle, *, depth: int = OPTIONS["depth"].default, width: int = OPTIONS["width"].default,
    activation: str = OPTIONS["activation"].default,
) -> nn.Module:
    """The model ``name`` shaped for ``data`` (inputs, outputs); ``ValueError`` if it cannot fit it.

    The model's size is checked before anything is allocated (see
    :func:`~descend._options.check_model_size`): a request beyond the machine's memory is an error.
    """
    from descend import nn as dnn

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    check("depth", depth)
    check("width", width)
    vector = data.input_kind == "vector"
    inputs = data.in_features if vector else (data.location_dim or 0) + (data.value_dim or 0)
    check_model_size(name, depth, width, inputs or 0, data.out_features, physical_memory())
    if name == "transformer" or data.input_kind == "tokens":
        if name != "transformer":
            raise ValueError(f"{data.name!r} holds token sequences; use --model transformer")
        if data.input_kind != "tokens":
            raise ValueError(f"model 'transformer' needs token sequences (e.g. --data stdlib-text), not {data.name!r}")
        return dnn.TransformerLM(data.out_features, int(data.info["context"]), width=width, depth=depth)  # type: ignore[call-overload]
    if name == "pointset":
        if vector:
            raise ValueError(
                f"model 'pointset' needs point-set data, but {data.name!r} is tabular; "
                "use --model linear, mlp or resmlp"
            )
        assert data.location_dim is not None and data.value_dim is not None
        cls = dnn.PointSetDecoder if data.input_kind == "pointset-query" else dnn.PointSetTransformer
        return cls(data.location_dim, data.value_dim, data.out_features, width=width, depth=depth)
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
    return dnn.ResidualMLP(data.in_features, data.out_features, width=width, depth=depth, activation=activation)


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


def make_optimizer(
    name: str, params: Any, *, lr: float | None = None, weight_decay: float | None = None, **kwargs: Any
) -> torch.optim.Optimizer:
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
