"""Build the model and optimizer a run names, and check that they fit the data.

Models: ``linear``, ``mlp``, ``resmlp`` (vector inputs) and ``pointset`` (point sets: a
:class:`~descend.nn.PointSetTransformer`, or a :class:`~descend.nn.PointSetDecoder` for query
tasks). Optimizers: ``gd`` (full-batch gradient descent: SGD fed the whole-set gradient) and every
name in :data:`descend.optim.OPTIMIZERS`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from descend import optim
from descend.data._base import DataBundle

__all__ = ["DEFAULT_LR", "MODELS", "OPTIMIZER_NAMES", "build_model", "make_optimizer", "optimizer_class"]

MODELS = ("linear", "mlp", "resmlp", "pointset")
OPTIMIZER_NAMES: tuple[str, ...] = ("gd", *optim.OPTIMIZERS)
FULL_BATCH = frozenset({"gd"})

#: A learning rate that works for an MLP on standardised data: the default and the LR-sweep centre.
DEFAULT_LR: dict[str, float] = {
    "gd": 0.3,
    "sgd": 0.1,
    "momentum": 0.1,
    "signsgd": 3e-4,
    "signum": 3e-4,
    "softsign": 3e-4,
    "lion": 3e-4,
    "adam": 1e-3,
    "adamw": 1e-3,
}


def build_model(
    name: str, data: DataBundle, *, depth: int = 2, width: int = 128, activation: str = "relu"
) -> nn.Module:
    """The model ``name`` shaped for ``data`` (inputs, outputs); ``ValueError`` if it cannot fit it."""
    from descend import nn as dnn

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    vector = data.input_kind == "vector"
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
        return dnn.MLP(data.in_features, data.out_features, hidden=width, depth=depth, activation=activation)
    return dnn.ResidualMLP(data.in_features, data.out_features, width=width, depth=depth, activation=activation)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class behind ``name`` (``gd`` is SGD)."""
    key = name.lower()
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    return optim.OPTIMIZERS["sgd" if key == "gd" else key]


def make_optimizer(
    name: str, params: Any, *, lr: float | None = None, weight_decay: float | None = None, **kwargs: Any
) -> torch.optim.Optimizer:
    """``optimizer_class(name)(params, lr=..., weight_decay=..., **kwargs)``.

    ``lr=None`` takes :data:`DEFAULT_LR`; ``weight_decay=None`` the class default. Options the class
    does not take (e.g. ``betas`` for SGD) are an error naming the options it does take.
    """
    cls = optimizer_class(name)
    lr = DEFAULT_LR[name.lower()] if lr is None else lr
    if not lr > 0:
        raise ValueError(f"the learning rate must be > 0, got lr={lr}")
    if weight_decay is not None:
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        kwargs["weight_decay"] = weight_decay
    accepted = inspect.signature(cls).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"optimizer {name!r} takes no option {unknown[0]!r}; it takes {', '.join(accepted)}")
    return cls(params, lr=lr, **kwargs)
