"""descend.train: the training loop and its parts (steps, losses, sampling, schedules, evaluation, metrics).

```python
from descend.train import Trainer, TrainConfig, build_model, make_optimizer
model = build_model("mlp", bundle)
trainer = Trainer(model, make_optimizer("adam", model.parameters()), bundle, TrainConfig(epochs=30), out_dir="run")
summary = trainer.fit()         # later: Trainer(...).resume(); trainer.fit()
```

The applications built on it live apart: run directories, ``predict`` and ``generate`` in
:mod:`descend.runs`, the optimizer benchmark in :mod:`descend.compare`, checkpoints in
:mod:`descend.checkpoint`. Their names that this package has always offered still import from
here; they are looked up on first use, so importing the library never imports an application.
"""

from importlib import import_module
from typing import Any

from descend.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from descend.train._build import (
    DEFAULT_LR,
    FULL_BATCH,
    MODELS,
    OPTIMIZER_NAMES,
    MemoryPlan,
    build_model,
    make_optimizer,
    memory_plan,
    optimizer_class,
    state_bytes_per_parameter,
)
from descend.train._callbacks import Callback
from descend.train._evaluate import EarlyStopping
from descend.train._losses import LOSSES, cross_entropy, get_loss, l2_penalty, mse
from descend.train._output import MetricsWriter, Progress
from descend.train._sampling import FullBatch, Minibatch, Sampler, Stream
from descend.train._schedule import SCHEDULES, Schedule
from descend.train._trainer import NonFiniteLossError, TrainConfig, Trainer, accumulate_gradient, seed_everything

#: Names that live in an application package, by the package that holds them.
_FORWARDED = {
    **dict.fromkeys(
        ("RUN_FILES", "RunError", "RunSpec", "check_out_dir", "load_run_spec", "prepare", "run_training"),
        "descend.runs",
    ),
    **dict.fromkeys(
        ("SUITES", "TASKS", "CompareSpec", "Task", "compare", "describe_tasks", "resolve_plan"),
        "descend.compare",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _FORWARDED:
        return getattr(import_module(_FORWARDED[name]), name)
    raise AttributeError(f"module 'descend.train' has no attribute {name!r}")


__all__ = [
    "DEFAULT_LR",
    "FULL_BATCH",
    "LOSSES",
    "MODELS",
    "OPTIMIZER_NAMES",
    "RUN_FILES",
    "SCHEDULES",
    "SUITES",
    "TASKS",
    "Callback",
    "Checkpoint",
    "CheckpointError",
    "CompareSpec",
    "EarlyStopping",
    "FullBatch",
    "MemoryPlan",
    "MetricsWriter",
    "Minibatch",
    "NonFiniteLossError",
    "Progress",
    "RunError",
    "RunSpec",
    "Sampler",
    "Schedule",
    "Stream",
    "Task",
    "TrainConfig",
    "Trainer",
    "accumulate_gradient",
    "build_model",
    "check_out_dir",
    "compare",
    "cross_entropy",
    "describe_tasks",
    "get_loss",
    "l2_penalty",
    "load_checkpoint",
    "load_run_spec",
    "make_optimizer",
    "memory_plan",
    "mse",
    "optimizer_class",
    "prepare",
    "resolve_plan",
    "run_training",
    "save_checkpoint",
    "seed_everything",
    "state_bytes_per_parameter",
]
