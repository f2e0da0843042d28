"""Every hyperparameter of descend, defined once: its type, default, help text and validation.

This module is the one home of the options that the library (:class:`TrainConfig`), the command
line (``descend train``, ``descend compare``), ``--config`` TOML files and ``--set key=value`` all
read. It imports neither torch nor numpy, so ``descend --help`` parses and prints without them.

An :class:`Option` describes one hyperparameter; :data:`OPTIONS` holds them by name. A dataclass
takes an option as a field with ``name: type = opt("name")`` (default and metadata from the
registry), and :func:`validate` checks every such field of an instance, so the same rule holds
wherever the value came from. Validation is strict: every number must be finite (no NaN/inf),
counts are integers in range, names are one of their choices.

Learning rates: :data:`DEFAULT_LR` is the one table of per-optimizer defaults (``lr=None`` means
"the optimizer's default from this table").
"""

from __future__ import annotations

import math
import re
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_LR",
    "DEVICE_PATTERN",
    "FULL_BATCH",
    "MISSING",
    "MODELS",
    "OPTIMIZER_NAMES",
    "OPTIMIZER_SUMMARY",
    "OPTIONS",
    "CompareSpec",
    "Option",
    "OptionError",
    "RunSpec",
    "TrainConfig",
    "check",
    "define",
    "opt",
    "option_of",
    "parameter_estimate",
    "validate",
]


class OptionError(ValueError):
    """An option has a value it cannot take; the message names the option, the value and what is valid."""


# --------------------------------------------------------------------------- names (torch-free)
#: The model names of ``--model``.
MODELS = ("linear", "mlp", "resmlp", "pointset", "transformer")
#: Activation names (the same as :data:`descend.nn.ACTIVATIONS`; a test keeps them equal).
ACTIVATIONS = ("relu", "sigmoid", "tanh", "gelu")
#: ``gd`` (full-batch gradient descent) and every optimizer in :data:`descend.optim.OPTIMIZERS`.
OPTIMIZER_NAMES = ("gd", "sgd", "momentum", "signsgd", "signum", "softsign", "lion", "adam", "adamw")
#: Optimizers that always take the full training set per step.
FULL_BATCH = frozenset({"gd"})

#: The default learning rate per optimizer name, for an MLP on standardised data: what ``lr=None``
#: resolves to in ``descend train``, ``descend compare`` and :func:`descend.train.make_optimizer`.
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

#: One line per optimizer: its update (``descend optimizers``; ``--explain`` prints the full chain).
OPTIMIZER_SUMMARY: dict[str, str] = {
    "gd": "w ← w − lr·∇L(w), the gradient of the whole training set (full-batch gradient descent)",
    "sgd": "w ← w − lr·g",
    "momentum": "m ← β·m + (1−β)·g;  w ← w − lr·m",
    "signsgd": "w ← w − lr·sign(g)",
    "signum": "m ← β·m + (1−β)·g;  w ← w − lr·sign(m)",
    "softsign": "m ← β·m + (1−β)·g;  w ← w − lr·m/(|m|+ε)",
    "lion": "w ← w − lr·(sign(β₁·m + (1−β₁)·g) + λ·w);  m ← β₂·m + (1−β₂)·g",
    "adam": "m ← β₁·m + (1−β₁)·g;  v ← β₂·v + (1−β₂)·g²;  w ← w − lr·m̂/(√v̂ + ε)",
    "adamw": "Adam's step plus decoupled weight decay w ← w − lr·λ·w",
}

#: ``--missing``: what a missing feature value does (see :func:`descend.data.tabular.from_arrays`).
MISSING = ("error", "drop", "mean")

#: ``--device``: auto, cpu, cuda, cuda:N or mps.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")

_MAX_INT = 2**63 - 1


# --------------------------------------------------------------------------- the option type
@dataclass(frozen=True)
class Option:
    """One hyperparameter: what it is, its default, how it is written and which values it takes.

    ``kind`` is ``int``, ``float``, ``str`` or ``bool``; ``nullable`` lets it be ``None`` (whose meaning
    ``none_means`` states in the help). Numbers must be finite and within ``[low, high]`` (``low_open`` /
    ``high_open`` make an end exclusive); strings one of ``choices`` (when given) or matching ``pattern``.
    ``aliases`` are extra words the command line reads (``{"full": None}`` for ``--batch-size full``).
    """

    name: str
    kind: type
    default: Any
    help: str
    metavar: str | None = None
    nullable: bool = False
    none_means: str | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    pattern: re.Pattern[str] | None = None
    aliases: dict[str, Any] = field(default_factory=dict)
    group: str = "training"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_text(self) -> str:
        """The default as the help shows it (once)."""
        if self.default is None:
            return self.none_means or "none"
        if self.kind is bool:
            return "on" if self.default else "off"
        return f"{self.default:g}" if self.kind is float else str(self.default)

    def range_text(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)

    def check(self, value: Any) -> Any:
        """``value`` if this option can take it (ints widened to float for floats), else :class:`OptionError`."""
        if value is None:
            if self.nullable:
                return None
            raise OptionError(f"{self.flag} needs a value ({self._expects()}), got none")
        kind = self.kind
        if kind is bool:
            if not isinstance(value, bool):
                raise OptionError(f"{self.flag} must be true or false, got {value!r}")
            return value
        if kind is str:
            if not isinstance(value, str) or not value.strip():
                raise OptionError(f"{self.flag} must be a non-empty string ({self._expects()}), got {value!r}")
            if self.choices is not None and value not in self.choices:
                what = self.name.replace("_", " ")
                raise OptionError(f"{self.flag}: unknown {what} {value!r}; choose one of {', '.join(self.choices)}")
            if self.pattern is not None and not self.pattern.match(value):
                raise OptionError(f"{self.flag} must be {self._expects()}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{self.flag} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        if kind is int:
            if isinstance(value, float):
                if not (math.isfinite(value) and value.is_integer()):
                    raise OptionError(f"{self.flag} must be an integer, got {value!r}")
                value = int(value)
            if abs(value) > _MAX_INT:
                raise OptionError(f"{self.flag} is out of range ({self._expects()}), got {value}")
        else:
            value = float(value)
            if not math.isfinite(value):
                raise OptionError(
                    f"{self.flag} must be a finite number {self.range_text()}".rstrip() + f", got {value}"
                )
        low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if low_bad or high_bad:
            raise OptionError(f"{self.flag} must be {self.range_text()}, got {value:g}")
        return value

    def _expects(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.name == "device":
            return "auto, cpu, cuda, cuda:N or mps"
        what = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}[self.kind]
        rng = self.range_text()
        return f"{what} {rng}".strip() + (" or none" if self.nullable else "")


def _o(name: str, kind: type, default: Any, help: str, **kw: Any) -> Option:
    return Option(name, kind, default, help, **kw)


_POSITIVE = {"low": 0, "low_open": True}

#: Every option by name. Groups: data, model, optimizer, training, output.
OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        # data
        _o(
            "data",
            str,
            "digits",
            "dataset: digits, digits-points, shapes, gp1d, stdlib-text, or a .csv/.npz/.txt file or a text directory",
            metavar="NAME|PATH",
            group="data",
        ),
        _o(
            "target",
            str,
            None,
            "the label column of a CSV file",
            metavar="COLUMN",
            nullable=True,
            none_means="required for a CSV file",
            group="data",
        ),
        _o(
            "task",
            str,
            None,
            "the learning task",
            metavar="TASK",
            nullable=True,
            none_means="inferred from the target",
            choices=("classification", "regression"),
            group="data",
        ),
        _o(
            "encoding",
            str,
            None,
            "text encoding of a CSV file (a Python codec name, e.g. latin-1)",
            metavar="NAME",
            nullable=True,
            none_means="UTF-8, with or without a byte-order mark",
            group="data",
        ),
        _o(
            "delimiter",
            str,
            None,
            "field delimiter of a CSV file",
            metavar="CHAR",
            nullable=True,
            none_means="sniffed: comma, semicolon or tab",
            group="data",
        ),
        _o(
            "missing",
            str,
            "error",
            "rows with a missing feature (an empty cell, NA or NaN): error; drop the row; or mean, the training "
            "rows' column mean (predict fills new rows with the same means)",
            metavar="HOW",
            choices=MISSING,
            group="data",
        ),
        _o(
            "normalize_points",
            bool,
            True,
            "centre each point set on its mean and scale it to unit RMS radius (point-set .npz files)",
            group="data",
        ),
        # model
        _o("model", str, "mlp", "the network", metavar="MODEL", choices=MODELS, group="model"),
        _o(
            "depth",
            int,
            2,
            "hidden layers (mlp), residual blocks (resmlp) or attention blocks (pointset)",
            metavar="N",
            low=0,
            high=1024,
            group="model",
        ),
        _o("width", int, 128, "hidden width of every layer", metavar="N", low=1, high=65536, group="model"),
        _o("heads", int, 4, "attention heads (pointset, transformer; must divide --width)", metavar="N", low=1,
           high=1024, group="model"),
        _o("context", int, 64, "tokens a transformer reads at once (text data)", metavar="N", low=1, high=65536,
           group="model"),
        _o("activation", str, "relu", "hidden activation", metavar="NAME", choices=ACTIVATIONS, group="model"),
        _o("checkpoint_activations", bool, False, "recompute each block's activations in the backward pass "
           "instead of storing them (resmlp, transformer): less memory, about one more forward pass", group="model"),
        # optimizer
        _o(
            "optimizer",
            str,
            "adam",
            "the optimizer (`descend optimizers` lists them)",
            metavar="NAME",
            choices=OPTIMIZER_NAMES,
            group="optimizer",
        ),
        _o(
            "lr",
            float,
            None,
            "learning rate",
            metavar="LR",
            nullable=True,
            none_means="the optimizer's own, see `descend optimizers`",
            group="optimizer",
            **_POSITIVE,
        ),
        _o("state_dtype", str, "float32", "the optimizer state's precision (bfloat16: half the bytes, rounded "
           "stochastically)", metavar="DTYPE", choices=("float32", "bfloat16"), group="optimizer"),
        _o(
            "weight_decay",
            float,
            None,
            "the optimizer's weight decay λ (decoupled for adamw and lion)",
            metavar="FLOAT",
            nullable=True,
            none_means="the optimizer's own",
            low=0,
            group="optimizer",
        ),
        _o(
            "l2",
            float,
            1e-3,
            "L2 penalty λ in the loss: loss + λ/2·‖w‖² (separate from --weight-decay)",
            metavar="FLOAT",
            low=0,
            group="optimizer",
        ),
        _o(
            "clip_grad_norm",
            float,
            None,
            "clip the gradient's global norm to this value",
            metavar="FLOAT",
            nullable=True,
            none_means="no clipping",
            group="optimizer",
            **_POSITIVE,
        ),
        _o(
            "schedule",
            str,
            "constant",
            "learning-rate schedule",
            metavar="NAME",
            choices=("constant", "cosine", "linear", "step"),
            group="optimizer",
        ),
        _o("warmup_steps", int, 0, "linear learning-rate warm-up steps", metavar="N", low=0, group="optimizer"),
        _o(
            "min_lr_factor",
            float,
            0.0,
            "final LR / initial LR of the cosine and linear schedules",
            metavar="FLOAT",
            low=0,
            high=1,
            group="optimizer",
        ),
        _o(
            "step_size", int, 1000, "steps between LR drops of the step schedule", metavar="N", low=1, group="optimizer"
        ),
        _o(
            "gamma",
            float,
            0.1,
            "LR factor per drop of the step schedule",
            metavar="FLOAT",
            low=0,
            low_open=True,
            high=1,
            group="optimizer",
        ),
        # training
        _o(
            "steps",
            int,
            None,
            "optimizer steps (overrides --epochs)",
            metavar="N",
            nullable=True,
            none_means="from --epochs",
            low=1,
        ),
        _o(
            "epochs",
            float,
            30.0,
            "passes over the training set (ignored when --steps is set)",
            metavar="FLOAT",
            nullable=True,
            none_means="from --steps",
            **_POSITIVE,
        ),
        _o(
            "batch_size",
            int,
            32,
            "examples per step; 'full' for full-batch gradient descent",
            metavar="N|full",
            nullable=True,
            none_means="full batch",
            low=1,
            aliases={"full": None},
        ),
        _o("replacement", bool, False, "sample minibatches with replacement instead of reshuffling each epoch"),
        _o("accumulation", int, 1, "minibatches whose gradients are averaged per step", metavar="N", low=1),
        _o(
            "chunk_size",
            int,
            None,
            "examples per forward pass in full-batch mode (bounds memory)",
            metavar="N",
            nullable=True,
            none_means="the whole set",
            low=1,
        ),
        _o("loss", str, "auto", "loss function", metavar="NAME", choices=("auto", "cross_entropy", "mse")),
        _o("bf16", bool, False, "bfloat16 autocast for forward passes"),
        _o("step_in_backward", bool, False, "step each parameter inside the backward pass as soon as its gradient "
           "is ready, then free it: one gradient alive at a time (no --clip-grad-norm or --accumulation)"),
        _o("seed", int, 0, "seed of the data split, initialisation and sampling", metavar="N", low=0),
        _o(
            "device",
            str,
            "auto",
            "where to train: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps",
            metavar="DEVICE",
            pattern=DEVICE_PATTERN,
        ),
        _o(
            "threads",
            int,
            None,
            "torch CPU threads",
            metavar="N",
            nullable=True,
            none_means="torch's own choice",
            low=1,
            high=4096,
        ),
        _o(
            "strategy",
            str,
            "ddp",
            "how W > 1 processes (torchrun, --nproc) share the model",
            metavar="NAME",
            choices=("ddp", "fsdp"),
        ),
        # evaluation and output
        _o(
            "eval_every",
            int,
            None,
            "steps between validations",
            metavar="N",
            nullable=True,
            none_means="once per epoch",
            low=1,
            group="output",
        ),
        _o(
            "eval_size",
            int,
            16384,
            "examples each evaluation reads at most, counted in tokens for text: the same evenly spaced "
            "subset of each split every time",
            metavar="N",
            nullable=True,
            none_means="every example",
            low=1,
            group="output",
        ),
        _o(
            "patience",
            int,
            None,
            "early stopping: validations without a lower validation loss",
            metavar="N",
            nullable=True,
            none_means="no early stopping",
            low=1,
            group="output",
        ),
        _o(
            "restore_best",
            bool,
            True,
            "end with the weights of the validation with the lowest loss (model.safetensors, the summary and "
            "predict use them; training itself continues to the budget)",
            group="output",
        ),
        _o(
            "log_every",
            int,
            None,
            "steps between logged metric rows",
            metavar="N",
            nullable=True,
            none_means="about 200 rows per run",
            low=1,
            group="output",
        ),
        _o(
            "checkpoint_every",
            int,
            None,
            "steps between checkpoints",
            metavar="N",
            nullable=True,
            none_means="at each validation",
            low=1,
            group="output",
        ),
        _o("keep_checkpoints", int, 2, "checkpoints kept on disk (the newest)", metavar="N", low=1, group="output"),
        _o("progress", bool, True, "progress bar on a terminal, periodic lines otherwise", group="output"),
        _o("tensorboard", bool, False, "also log to TensorBoard (needs `pip install tensorboard`)", group="output"),
    ]
}

GROUPS = {
    "data": "data",
    "model": "model",
    "optimizer": "optimizer and schedule",
    "training": "training",
    "output": "evaluation and output",
}


def define(name: str, kind: type, default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field for an option that only one command has (not in :data:`OPTIONS`).

    ``seeds: int = define("seeds", int, 3, "seeds per optimizer", metavar="N", low=1)``.
    """
    option = Option(name, kind, default, help, **kw)
    return field(default=default, metadata={"option": option})


def opt(name: str) -> Any:
    """The dataclass field of the shared option ``name``: its one default, help and validation."""
    option = OPTIONS[name]
    return field(default=option.default, metadata={"option": option})


def option_of(f: Field[Any]) -> Option | None:
    """The :class:`Option` behind a dataclass field (``None`` for a field that is not an option)."""
    option = f.metadata.get("option")
    if option is not None and option.name != f.name:  # defined under another name: rename
        option = Option(**{**{k.name: getattr(option, k.name) for k in fields(option)}, "name": f.name})
    return option


def check(name: str, value: Any) -> Any:
    """Validate ``value`` for the shared option ``name`` (see :meth:`Option.check`)."""
    return OPTIONS[name].check(value)


def validate(obj: Any) -> None:
    """Check every option field of the dataclass instance ``obj``, normalising ints given for floats.

    Raises :class:`OptionError` naming the first field out of range.
    """
    for f in fields(obj):
        option = option_of(f)
        if option is not None:
            object.__setattr__(obj, f.name, option.check(getattr(obj, f.name)))


def from_values(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)`` with an :class:`OptionError` naming an unknown key (and listing the known ones)."""
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r}; valid options are {', '.join(sorted(known))}")
    return cls(**values)


# --------------------------------------------------------------------------- model size
#: The largest model (parameters) a run may allocate; beyond it a run refuses to start.
MAX_PARAMETERS = 2_000_000_000


def parameter_estimate(model: str, depth: int, width: int, inputs: int, outputs: int) -> int:
    """An estimate of a model's parameter count, computed before anything is allocated.

    ``inputs`` is the feature count (vectors) or ``location_dim + value_dim`` (point sets). MLP:
    ``(in+1)·w + (depth−1)·(w+1)·w + (w+1)·out``; residual MLP and point-set attention blocks are
    counted as ``depth`` blocks of ``c·w²`` with ``c = 2`` and ``12`` (two linear layers; attention's
    four projections plus a 4×-wide feed-forward).
    """
    if model == "linear":
        return (inputs + 1) * outputs
    if model == "mlp":
        if depth == 0:
            return (inputs + 1) * outputs
        return (inputs + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * outputs
    per_block = 2 if model == "resmlp" else 12
    return (inputs + 1) * width + depth * per_block * (width + 1) * width + (width + 1) * outputs


def check_model_size(model: str, depth: int, width: int, inputs: int, outputs: int, memory_bytes: int | None,
                     bytes_per_parameter: int = 16) -> None:
    """Refuse, before allocation, a model whose weights, gradients and optimizer state
    (``bytes_per_parameter``: 16 for float32 weights, gradients and two state tensors) would not fit in
    half of ``memory_bytes`` (or beyond :data:`MAX_PARAMETERS`)."""
    n = parameter_estimate(model, depth, width, inputs, outputs)
    per = max(1, bytes_per_parameter)
    budget = MAX_PARAMETERS if memory_bytes is None else min(MAX_PARAMETERS, memory_bytes // 2 // per)
    if n > budget:
        raise OptionError(
            f"--depth {depth} --width {width} gives model {model!r} about {n:.3g} parameters "
            f"({per * n / 2**30:.3g} GiB with gradients and optimizer state), more than the {budget:.3g} this machine "
            "allows; choose a smaller --depth or --width"
        )


def physical_memory() -> int | None:
    """Bytes of physical memory (``None`` where the system does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- the library's options
@dataclass
class TrainConfig:
    """Everything that decides how a model is trained (not what model, data or optimizer).

    Length: ``steps`` optimizer steps, or else ``epochs`` passes over the training set.
    Sampling: ``batch_size=None`` is full-batch gradient descent (``chunk_size`` bounds the examples
    per forward pass); otherwise minibatches, reshuffled each epoch or drawn with ``replacement``,
    ``accumulation`` of them averaged per step. The loss minimised is
    ``mean ℓ + l2/2·‖w‖²`` (weight decay, if any, belongs to the optimizer). ``eval_every`` /
    ``log_every`` / ``checkpoint_every`` count steps (``None``: once per epoch / about 200 rows per
    run / at each evaluation). Each evaluation reads at most ``eval_size`` examples of a split (tokens,
    for token sequences; ``None``: all): the same evenly spaced subset every time. ``patience``: stop
    after that many evaluations without a lower validation loss. ``restore_best``: end with the weights
    of the evaluation with the lowest validation loss (the summary's ``weights_step``), not the last
    step's. Each field's default, range and meaning are those of :data:`OPTIONS` (the command line's
    ``--flag`` of the same name); constructing one validates every field.
    """

    steps: int | None = opt("steps")
    epochs: float | None = opt("epochs")
    batch_size: int | None = opt("batch_size")
    replacement: bool = opt("replacement")
    accumulation: int = opt("accumulation")
    chunk_size: int | None = opt("chunk_size")
    loss: str = opt("loss")
    l2: float = opt("l2")
    schedule: str = opt("schedule")
    warmup_steps: int = opt("warmup_steps")
    min_lr_factor: float = opt("min_lr_factor")
    step_size: int = opt("step_size")
    gamma: float = opt("gamma")
    clip_grad_norm: float | None = opt("clip_grad_norm")
    bf16: bool = opt("bf16")
    step_in_backward: bool = opt("step_in_backward")
    eval_every: int | None = opt("eval_every")
    eval_size: int | None = opt("eval_size")
    log_every: int | None = opt("log_every")
    checkpoint_every: int | None = opt("checkpoint_every")
    keep_checkpoints: int = opt("keep_checkpoints")
    patience: int | None = opt("patience")
    restore_best: bool = opt("restore_best")
    seed: int = opt("seed")
    progress: bool = opt("progress")
    tensorboard: bool = opt("tensorboard")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate(self)
        if self.steps is None and self.epochs is None:
            raise OptionError("give --steps or --epochs (steps=None and epochs=None leave the run no length)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunSpec:
    """Every option of ``descend train``: the data, model and optimizer, plus every :class:`TrainConfig` field.

    Each field is settable by flag, ``--config`` TOML or ``--set key=value``, with the default and
    validation of :data:`OPTIONS`; constructing one validates it.
    """

    data: str = opt("data")
    target: str | None = opt("target")
    task: str | None = opt("task")
    encoding: str | None = opt("encoding")
    delimiter: str | None = opt("delimiter")
    missing: str = opt("missing")
    normalize_points: bool = opt("normalize_points")
    model: str = opt("model")
    depth: int = opt("depth")
    width: int = opt("width")
    heads: int = opt("heads")
    context: int = opt("context")
    activation: str = opt("activation")
    checkpoint_activations: bool = opt("checkpoint_activations")
    optimizer: str = opt("optimizer")
    lr: float | None = opt("lr")
    weight_decay: float | None = opt("weight_decay")
    state_dtype: str = opt("state_dtype")
    l2: float = opt("l2")
    clip_grad_norm: float | None = opt("clip_grad_norm")
    schedule: str = opt("schedule")
    warmup_steps: int = opt("warmup_steps")
    min_lr_factor: float = opt("min_lr_factor")
    step_size: int = opt("step_size")
    gamma: float = opt("gamma")
    steps: int | None = opt("steps")
    epochs: float | None = opt("epochs")
    batch_size: int | None = opt("batch_size")
    replacement: bool = opt("replacement")
    accumulation: int = opt("accumulation")
    chunk_size: int | None = opt("chunk_size")
    loss: str = opt("loss")
    bf16: bool = opt("bf16")
    step_in_backward: bool = opt("step_in_backward")
    seed: int = opt("seed")
    device: str = opt("device")
    threads: int | None = opt("threads")
    strategy: str = opt("strategy")
    eval_every: int | None = opt("eval_every")
    eval_size: int | None = opt("eval_size")
    patience: int | None = opt("patience")
    restore_best: bool = opt("restore_best")
    log_every: int | None = opt("log_every")
    checkpoint_every: int | None = opt("checkpoint_every")
    keep_checkpoints: int = opt("keep_checkpoints")
    progress: bool = opt("progress")
    tensorboard: bool = opt("tensorboard")

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        return from_values(cls, values)  # type: ignore[no-any-return]

    def validate(self) -> None:
        """Raise :class:`OptionError` naming the first option out of range."""
        validate(self)
        if self.steps is None and self.epochs is None:
            raise OptionError("give --steps or --epochs")

    @property
    def resolved_lr(self) -> float:
        """``lr``, or the optimizer's default from :data:`DEFAULT_LR`."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` part (``gd`` trains on the full batch; ``steps`` overrides ``epochs``)."""
        shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(self)}
        values = {k: getattr(self, k) for k in shared}
        if self.optimizer in FULL_BATCH:
            values["batch_size"] = None  # gd is SGD on the exact full-batch gradient
        if self.steps is not None:
            values["epochs"] = None
        return TrainConfig(**values)


@dataclass
class CompareSpec:
    """Every option of ``descend compare``: which tasks (workloads), optimizers, seeds and tuning grid.

    ``None`` means "the suite's default" (see :data:`descend.train._tasks.SUITES`): the quick suite
    runs 3 tasks with 5 optimizers, 1 tuning seed and 3 final seeds; the full suite every task with
    8 optimizers, 2 tuning seeds and 5 final seeds.
    """

    task: str | None = define(
        "task", str, None, "task names, comma-separated, or 'all' (see --list)", metavar="NAMES",
        nullable=True, none_means="the suite's tasks",
    )  # fmt: skip
    suite: str = define(
        "suite", str, "quick", "quick (3 tasks, 3 seeds, minutes) or full (every task, 5 seeds)",
        metavar="NAME", choices=("quick", "full"),
    )  # fmt: skip
    optimizers: str | None = define(
        "optimizers", str, None, "comma-separated optimizer names", metavar="NAMES", nullable=True,
        none_means="the suite's", group="optimizer",
    )  # fmt: skip
    seeds: int | None = define(
        "seeds", int, None, "seeds per optimizer at its tuned learning rate", metavar="N", nullable=True,
        none_means="3 (quick) or 5 (full)", low=1, high=1000,
    )  # fmt: skip
    tune_seeds: int | None = define(
        "tune_seeds", int, None, "seeds averaged per learning rate while tuning", metavar="N", nullable=True,
        none_means="1 (quick) or 2 (full)", low=1, high=100,
    )  # fmt: skip
    grid: str | None = define(
        "grid", str, None, "multipliers of each optimizer's grid centre (a task's scaled default lr)",
        metavar="M,M,...", nullable=True, none_means="0.316,1,3.16", group="optimizer",
    )  # fmt: skip
    max_extensions: int = define(
        "max_extensions", int, 3, "grid points added beyond an edge while the best rate sits there",
        metavar="N", low=0, high=20, group="optimizer",
    )  # fmt: skip
    steps: int | None = define(
        "steps", int, None, "optimizer steps of every run, overriding each task's budget (smoke tests)",
        metavar="N", nullable=True, none_means="each task's own budget", low=1,
    )  # fmt: skip
    workers: int = define(
        "workers", int, 2, "processes running (task, optimizer) units in parallel, one thread each by default",
        metavar="N", low=1, high=256,
    )  # fmt: skip
    device: str = opt("device")
    threads: int | None = define(
        "threads", int, 1, "torch CPU threads per run (small models run fastest on one)", metavar="N",
        nullable=True, none_means="torch's own choice", low=1, high=4096,
    )  # fmt: skip

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompareSpec:
        return from_values(cls, values)  # type: ignore[no-any-return]

    def optimizer_list(self) -> list[str]:
        """The optimizers named by ``--optimizers`` (``[]``: the suite's); :class:`OptionError` on a bad name."""
        if self.optimizers is None:
            return []
        names = [n.strip().lower() for n in self.optimizers.split(",") if n.strip()]
        for n in names:
            if n not in OPTIMIZER_NAMES:
                raise OptionError(f"unknown optimizer {n!r} in --optimizers; choose from {', '.join(OPTIMIZER_NAMES)}")
        if not names:
            raise OptionError("--optimizers is empty; give comma-separated names, e.g. sgd,adam")
        return names

    def multipliers(self) -> list[float]:
        """The ``--grid`` multipliers (``[]``: the default grid); :class:`OptionError` if malformed."""
        if self.grid is None:
            return []
        try:
            values = [float(m) for m in self.grid.split(",") if m.strip()]
        except ValueError as e:
            raise OptionError(f"--grid must be comma-separated numbers, got {self.grid!r}") from e
        if not values or any(not (math.isfinite(m) and m > 0) for m in values):
            raise OptionError(f"--grid needs positive finite multipliers, got {self.grid!r}")
        return values


def option_fields(cls: type) -> list[tuple[Field[Any], Option]]:
    """``(field, option)`` for every option field of the dataclass ``cls``, in order."""
    out = []
    for f in fields(cls):
        option = option_of(f)
        if option is not None:
            out.append((f, option))
    return out
