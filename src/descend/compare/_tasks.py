"""The workloads of ``descend compare``: each a model, an offline data set, a validation target and a step budget.

A :class:`Task` fixes everything but the optimizer and its learning rate (DeepOBS / AlgoPerf
"workloads"): the data split (seed 0), the model family, the batch size, the number of steps and the
*validation target*, a value of the task's metric that a well-tuned optimizer reaches inside the
budget. :data:`TASKS` holds them by name; :data:`SUITES` names the sets ``descend compare`` runs.

``badly-scaled`` is built here: least squares on features ``x_j = s_j z_j`` with ``z ~ N(0, I)``
and scales ``s_j`` log-spaced from ``1e-2`` to ``1e2``, targets ``y = z·w* + 0.1 ε``. The Hessian
of the loss is ``2·diag(s²)``-like with condition number ~``1e8``, so full-batch gradient descent,
whose step must stay below ``2/λ_max``, barely moves the small-scale coordinates, while methods
that normalise each coordinate (sign methods, Adam) do not care about the scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from descend._random import generator
from descend.data._base import DataBundle, Split

__all__ = ["SUITES", "TASKS", "Task", "get_task", "load_task_data", "make_badly_scaled", "suite_tasks"]


@dataclass(frozen=True)
class Task:
    """One workload.

    ``metric`` is ``"accuracy"`` (higher is better) or ``"loss"`` (lower is better), measured on the
    validation split for the target and on the test split for the final result. ``lr_scale[name]``
    multiplies :data:`~descend.train.DEFAULT_LR` to centre each optimizer's tuning grid (default 1).
    ``batch_size=None`` trains every optimizer on the full batch; ``gd`` always uses the full batch.
    """

    name: str
    summary: str
    data: str
    model: Callable[[DataBundle], nn.Module]
    metric: str
    target: float
    steps: int
    batch_size: int | None
    eval_every: int
    unit: str = ""
    lr_scale: dict[str, float] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def reached(self, value: float) -> bool:
        """Whether a value of the metric meets the target."""
        return value >= self.target if self.higher_is_better else value <= self.target

    def describe(self) -> str:
        batch = "full batch" if self.batch_size is None else f"batch {self.batch_size}"
        relation = "≥" if self.higher_is_better else "≤"
        unit = f" {self.unit}" if self.unit else ""
        return (
            f"{self.summary}; {self.steps} steps, {batch}; target: validation {self.metric} "
            f"{relation} {self.target:g}{unit}"
        )


def make_badly_scaled(seed: int = 0, *, features: int = 32, n_train: int = 512, n_val: int = 256, n_test: int = 256,
                      noise: float = 0.1) -> DataBundle:
    """Least squares with features scaled from ``1e-2`` to ``1e2`` (see the module docstring)."""
    g = generator(seed)
    n = n_train + n_val + n_test
    z = torch.randn(n, features, generator=g)
    scales = torch.logspace(-2, 2, features)
    w = torch.randn(features, generator=g) / features**0.5
    y = (z @ w + noise * torch.randn(n, generator=g))[:, None]
    x = z * scales

    def split(a: int, b: int) -> Split:
        return Split((x[a:b],), y[a:b])

    return DataBundle(
        name="badly-scaled",
        task="regression",
        input_kind="vector",
        train=split(0, n_train),
        val=split(n_train, n_train + n_val),
        test=split(n_train + n_val, n),
        out_features=1,
        in_features=features,
        info={"scales": [1e-2, 1e2], "noise_variance": noise**2, "seed": seed},
    )


@lru_cache(maxsize=8)
def load_task_data(data: str) -> DataBundle:
    """The task's data set (split seed 0), loaded once per process."""
    if data == "badly-scaled":
        return make_badly_scaled(0)
    from descend.data.registry import load_data

    return load_data(data, seed=0)


def _mlp(depth: int, width: int, activation: str) -> Callable[[DataBundle], nn.Module]:
    def build(bundle: DataBundle) -> nn.Module:
        from descend.nn import MLP

        assert bundle.in_features is not None
        return MLP(bundle.in_features, bundle.out_features, width=width, depth=depth, activation=activation)

    return build


def _resmlp(depth: int, width: int, activation: str) -> Callable[[DataBundle], nn.Module]:
    def build(bundle: DataBundle) -> nn.Module:
        from descend.nn import ResidualMLP

        assert bundle.in_features is not None
        return ResidualMLP(bundle.in_features, bundle.out_features, width=width, depth=depth, activation=activation)

    return build


def _linear(bundle: DataBundle) -> nn.Module:
    from descend.nn import Linear

    assert bundle.in_features is not None
    model = Linear(bundle.in_features, bundle.out_features)
    nn.init.normal_(model.weight, std=0.01)  # w ≈ 0: the loss starts near var(y) for every optimizer and seed
    assert model.bias is not None
    nn.init.zeros_(model.bias)
    return model


def _pointset(bundle: DataBundle) -> nn.Module:
    from descend.nn import PointSetTransformer

    assert bundle.location_dim is not None and bundle.value_dim is not None
    return PointSetTransformer(bundle.location_dim, bundle.value_dim, bundle.out_features, width=32, depth=1)


def _transformer(bundle: DataBundle) -> nn.Module:
    from descend.nn import TransformerLM

    return TransformerLM(bundle.out_features, int(bundle.info["context"]), width=64, depth=2, heads=4)  # type: ignore[call-overload]


_SIGN = {"signsgd": 3.0, "signum": 3.0, "softsign": 3.0, "lion": 3.0}

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "digits-mlp",
            "8x8 digits (scikit-learn), MLP 64-64-64-10 (ReLU), cross-entropy",
            "digits",
            _mlp(2, 64, "relu"),
            "accuracy",
            0.95,
            steps=300,
            batch_size=32,
            eval_every=25,
        ),
        Task(
            "badly-scaled",
            "least squares, 32 features scaled 1e-2..1e2 (condition number ~1e8), linear model; var(y) = 1.35, "
            "noise floor 0.01",
            "badly-scaled",
            _linear,
            "loss",
            0.9,
            steps=200,
            batch_size=None,
            eval_every=10,
            unit="mean squared error",
            lr_scale={
                "sgd": 1e-3,
                "momentum": 1e-3,
                "gd": 3e-4,
                "adam": 300.0,
                "adamw": 300.0,
                **dict.fromkeys(_SIGN, 10.0),
            },
        ),
        Task(
            "text-lm",
            "byte-level causal transformer LM (2 pre-norm blocks, width 64, 121k parameters) on "
            "the Python standard library's source, context 64",
            "stdlib-text",
            _transformer,
            "loss",
            2.8,
            steps=200,
            batch_size=16,
            eval_every=25,
            unit="nats/byte",
            lr_scale={"sgd": 3.0, "momentum": 3.0, "adam": 3.0, "adamw": 3.0, **_SIGN},
        ),
        Task(
            "pointset-digits",
            "digits as point sets (pixels as (row, column): intensity points), PointSetTransformer (1 block, width 32)",
            "digits-points",
            _pointset,
            "accuracy",
            0.8,
            steps=300,
            batch_size=32,
            eval_every=25,
        ),
        Task(
            "deep-sigmoid",
            "digits, plain MLP with 6 sigmoid hidden layers of width 64 (vanishing gradients: within the budget "
            "the best methods get well above chance, 0.1, not near the shallow network's 0.97)",
            "digits",
            _mlp(6, 64, "sigmoid"),
            "accuracy",
            0.3,
            steps=400,
            batch_size=32,
            eval_every=25,
        ),
        Task(
            "deep-residual",
            "digits, pre-norm residual MLP with 6 sigmoid blocks of width 64 (gradient flows along the skips)",
            "digits",
            _resmlp(6, 64, "sigmoid"),
            "accuracy",
            0.9,
            steps=400,
            batch_size=32,
            eval_every=25,
        ),
    )
}

#: Suite name -> (tasks, optimizers, final seeds, tuning seeds).
SUITES: dict[str, tuple[tuple[str, ...], tuple[str, ...], int, int]] = {
    "quick": (("digits-mlp", "badly-scaled", "text-lm"), ("sgd", "momentum", "signum", "adam"), 3, 1),
    "full": (
        tuple(TASKS),
        ("sgd", "momentum", "signsgd", "signum", "softsign", "lion", "adam", "adamw"),
        5,
        2,
    ),
}


def get_task(name: str) -> Task:
    """The task ``name``; ``ValueError`` naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)} (or 'all')")
    return TASKS[name]


def suite_tasks(names: str) -> list[Task]:
    """``"a,b"`` or ``"all"`` -> the tasks, in the order given (``all``: every task)."""
    if names.strip() == "all":
        return list(TASKS.values())
    picked = [n.strip() for n in names.split(",") if n.strip()]
    if not picked:
        raise ValueError("--task is empty; give task names separated by commas, or 'all' (see --list)")
    return [get_task(n) for n in dict.fromkeys(picked)]
