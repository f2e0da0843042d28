# ruff: noqa: E501
# (the option tables keep one row per option, however long its help)
"""Every hyperparameter of descend, defined once: its type, default, help text and validation.

This module is the one home of the options that the library (:class:`TrainConfig`), the command
line (``descend train``, ``descend compare``), ``--config`` TOML files and ``--set key=value`` all
read. It imports neither torch nor numpy, so ``descend --help`` parses and prints without them.

An :class:`Option` describes one hyperparameter; :data:`OPTIONS` holds those of ``descend train``
(one row each) and :data:`COMPARE_OPTIONS` those of ``descend compare``. A dataclass field comes
from a table by :func:`opt` (``steps: int | None = opt("steps")``), or a whole dataclass, one field
per row, by :func:`options_dataclass`; :func:`validate` checks every such field of an instance, so
the same rule holds wherever the value came from. Validation is strict: every number must be finite
(no NaN/inf), counts are integers in range, names are one of their choices.

The names of the models, activations and optimizers are the tables here, which the torch side
reads (:data:`descend.nn.ACTIVATIONS`, :data:`descend.optim.OPTIMIZERS`), so the help needs no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import Any

__all__ = [
    "ACTIVATIONS",
    "COMPARE_OPTIONS",
    "DEFAULT_LR",
    "DEVICE_PATTERN",
    "FULL_BATCH",
    "MISSING",
    "MODELS",
    "OPTIMIZER_NAMES",
    "OPTIMIZER_SUMMARY",
    "OPTIONS",
    "PRESET_NAMES",
    "CompareSpec",
    "Option",
    "OptionError",
    "RunSpec",
    "TrainConfig",
    "check",
    "opt",
    "option_of",
    "options_dataclass",
    "validate",
]


class OptionError(ValueError):
    """An option has a value it cannot take; the message names the option, the value and what is valid."""


# --------------------------------------------------------------------------- names (torch-free)
#: The model names of ``--model`` (:func:`descend.nn.parameter_estimate` sizes each).
MODELS = ("linear", "mlp", "resmlp", "pointset", "transformer")
#: The hidden activations of ``--activation`` and of :func:`descend.nn.make_activation`.
ACTIVATIONS = ("relu", "sigmoid", "tanh", "gelu")

#: Every optimizer of ``--optimizer``: its default learning rate (for an MLP on standardised data: what
#: ``lr=None`` resolves to in ``descend train``, ``descend compare``, :func:`descend.train.make_optimizer`
#: and each preset's signature) and its update in one line (``descend optimizers``; ``--explain`` prints
#: the full chain). ``gd`` is the command line's name for SGD fed the whole-set gradient; every other name
#: is a preset of :data:`descend.optim.OPTIMIZERS`.
_OPTIMIZERS: dict[str, tuple[float, str]] = {
    "gd": (0.3, "w ← w − lr·∇L(w), the gradient of the whole training set (full-batch gradient descent)"),
    "sgd": (0.1, "w ← w − lr·g"),
    "momentum": (0.1, "m ← β·m + (1−β)·g;  w ← w − lr·m"),
    "signsgd": (3e-4, "w ← w − lr·sign(g)"),
    "signum": (3e-4, "m ← β·m + (1−β)·g;  w ← w − lr·sign(m)"),
    "softsign": (3e-4, "m ← β·m + (1−β)·g;  w ← w − lr·m/(|m|+ε)"),
    "lion": (3e-4, "w ← w − lr·(sign(β₁·m + (1−β₁)·g) + λ·w);  m ← β₂·m + (1−β₂)·g"),
    "adam": (1e-3, "m ← β₁·m + (1−β₁)·g;  v ← β₂·v + (1−β₂)·g²;  w ← w − lr·m̂/(√v̂ + ε)"),
    "adamw": (1e-3, "Adam's step plus decoupled weight decay w ← w − lr·λ·w"),
}
OPTIMIZER_NAMES = tuple(_OPTIMIZERS)
DEFAULT_LR: dict[str, float] = {name: lr for name, (lr, _) in _OPTIMIZERS.items()}
OPTIMIZER_SUMMARY: dict[str, str] = {name: summary for name, (_, summary) in _OPTIMIZERS.items()}
#: Optimizers that always take the full training set per step.
FULL_BATCH = frozenset({"gd"})
#: The names of :data:`descend.optim.OPTIMIZERS`, in order: every optimizer name but the full-batch ones.
PRESET_NAMES = tuple(name for name in OPTIMIZER_NAMES if name not in FULL_BATCH)

#: ``--missing``: what a missing feature value does (see :func:`descend.data.tabular.from_arrays`).
MISSING = ("error", "drop", "mean")

#: ``--device``: auto, cpu, cuda, cuda:N or mps.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")

_MAX_INT = 2**63 - 1
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


# --------------------------------------------------------------------------- the option type
@dataclass(frozen=True)
class Option:
    """One hyperparameter: what it is, its default, how it is written and which values it takes.

    ``kind`` is ``int``, ``float``, ``str`` or ``bool``. ``none_means`` (what ``None`` stands for, as the
    help states it) makes ``None`` a valid value. Numbers must be finite and inside the interval
    ``within``, written as in mathematics: ``"[0, 1024]"``, ``"(0, 1]"``, ``"[1, inf)"``. Strings must be
    one of ``choices`` (when given) or match ``pattern``. ``aliases`` are extra words the command line
    reads (``{"full": None}`` for ``--batch-size full``); ``group`` is the help's section.
    """

    name: str
    kind: type
    default: Any
    help: str
    metavar: str | None = None
    none_means: str | None = None
    within: str | None = None
    choices: tuple[str, ...] | None = None
    pattern: re.Pattern[str] | None = None
    aliases: dict[str, Any] = field(default_factory=dict)
    group: str = "training"

    def __post_init__(self) -> None:
        if self.within is not None and not _INTERVAL.match(self.within):
            raise ValueError(f"option {self.name}: within={self.within!r} is not an interval such as '[0, 1]'")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def nullable(self) -> bool:
        """Whether ``None`` is a value of this option."""
        return self.none_means is not None

    def bounds(self) -> tuple[float | None, bool, float | None, bool]:
        """``(low, low_open, high, high_open)`` of ``within``; an infinite end is ``None``."""
        match = _INTERVAL.match(self.within or "[-inf, inf]")
        assert match is not None  # checked when the option was made
        opening, low, high, closing = match.groups()
        return (None if low == "-inf" else float(low), opening == "(",
                None if high == "inf" else float(high), closing == ")")  # fmt: skip

    def default_text(self) -> str:
        """The default as the help shows it (once)."""
        if self.default is None:
            return self.none_means or "none"
        if self.kind is bool:
            return "on" if self.default else "off"
        return f"{self.default:g}" if self.kind is float else str(self.default)

    def range_text(self) -> str:
        low, low_open, high, high_open = self.bounds()
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
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
        low, low_open, high, high_open = self.bounds()
        low_bad = low is not None and (value <= low if low_open else value < low)
        high_bad = high is not None and (value >= high if high_open else value > high)
        if low_bad or high_bad:
            raise OptionError(f"{self.flag} must be {self.range_text()}, got {value:g}")
        return value

    def _expects(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.pattern is DEVICE_PATTERN:
            return "auto, cpu, cuda, cuda:N or mps"
        what = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}[self.kind]
        return f"{what} {self.range_text()}".strip() + (" or none" if self.nullable else "")


def _table(*rows: str | Option) -> dict[str, Option]:
    """Options by name; a string row names the help section (``group``) of the options below it."""
    table, group = {}, "training"
    for row in rows:
        if isinstance(row, str):
            group = row
        else:
            table[row.name] = replace(row, group=group)
    return table


#: Every option of ``descend train`` (and so of :class:`RunSpec`, in this order): name, type, default,
#: help and metavar, then what ``None`` means and the valid values. A long help line is still one row.
OPTIONS: dict[str, Option] = _table(
    "data",
    Option("data", str, "digits", "dataset: digits, digits-points, shapes, gp1d, stdlib-text, or a .csv/.npz/.txt file or a text directory", "NAME|PATH"),
    Option("target", str, None, "the label column of a CSV file", "COLUMN", none_means="required for a CSV file"),
    Option("task", str, None, "the learning task", "TASK", none_means="inferred from the target", choices=("classification", "regression")),
    Option("encoding", str, None, "text encoding of a CSV file (a Python codec name, e.g. latin-1)", "NAME", none_means="UTF-8, with or without a byte-order mark"),
    Option("delimiter", str, None, "field delimiter of a CSV file", "CHAR", none_means="sniffed: comma, semicolon or tab"),
    Option("missing", str, "error", "rows with a missing feature (an empty cell, NA or NaN): error; drop the row; or mean, the training rows' column mean (predict fills new rows with the same means)", "HOW", choices=MISSING),
    Option("normalize_points", bool, True, "centre each point set on its mean and scale it to unit RMS radius (point-set .npz files)"),
    "model",
    Option("model", str, "mlp", "the network", "MODEL", choices=MODELS),
    Option("depth", int, 2, "hidden layers (mlp), residual blocks (resmlp) or attention blocks (pointset)", "N", within="[0, 1024]"),
    Option("width", int, 128, "hidden width of every layer", "N", within="[1, 65536]"),
    Option("heads", int, 4, "attention heads (pointset, transformer; must divide --width)", "N", within="[1, 1024]"),
    Option("context", int, 64, "tokens a transformer reads at once (text data)", "N", within="[1, 65536]"),
    Option("activation", str, "relu", "hidden activation", "NAME", choices=ACTIVATIONS),
    Option("checkpoint_activations", bool, False, "recompute each block's activations in the backward pass instead of storing them (resmlp, transformer): less memory, about one more forward pass"),
    "optimizer",
    Option("optimizer", str, "adam", "the optimizer (`descend optimizers` lists them)", "NAME", choices=OPTIMIZER_NAMES),
    Option("lr", float, None, "learning rate", "LR", none_means="the optimizer's own, see `descend optimizers`", within="(0, inf)"),
    Option("weight_decay", float, None, "the optimizer's weight decay λ (decoupled for adamw and lion)", "FLOAT", none_means="the optimizer's own", within="[0, inf)"),
    Option("state_dtype", str, "float32", "the optimizer state's precision (bfloat16: half the bytes, rounded stochastically; int8: 8-bit blocks, about a quarter)", "DTYPE", choices=("float32", "bfloat16", "int8")),
    Option("l2", float, 1e-3, "L2 penalty λ in the loss: loss + λ/2·‖w‖² (separate from --weight-decay)", "FLOAT", within="[0, inf)"),
    Option("clip_grad_norm", float, None, "clip the gradient's global norm to this value", "FLOAT", none_means="no clipping", within="(0, inf)"),
    Option("schedule", str, "constant", "learning-rate schedule", "NAME", choices=("constant", "cosine", "linear", "step")),
    Option("warmup_steps", int, 0, "linear learning-rate warm-up steps", "N", within="[0, inf)"),
    Option("min_lr_factor", float, 0.0, "final LR / initial LR of the cosine and linear schedules", "FLOAT", within="[0, 1]"),
    Option("step_size", int, 1000, "steps between LR drops of the step schedule", "N", within="[1, inf)"),
    Option("gamma", float, 0.1, "LR factor per drop of the step schedule", "FLOAT", within="(0, 1]"),
    "training",
    Option("steps", int, None, "optimizer steps (overrides --epochs)", "N", none_means="from --epochs", within="[1, inf)"),
    Option("epochs", float, 30.0, "passes over the training set (ignored when --steps is set)", "FLOAT", none_means="from --steps", within="(0, inf)"),
    Option("batch_size", int, 32, "examples per step; 'full' for full-batch gradient descent", "N|full", none_means="full batch", within="[1, inf)", aliases={"full": None}),
    Option("replacement", bool, False, "sample minibatches with replacement instead of reshuffling each epoch"),
    Option("accumulation", int, 1, "minibatches whose gradients are averaged per step", "N", within="[1, inf)"),
    Option("chunk_size", int, None, "examples per forward pass in full-batch mode (bounds memory)", "N", none_means="the whole set", within="[1, inf)"),
    Option("loss", str, "auto", "loss function", "NAME", choices=("auto", "cross_entropy", "mse")),
    Option("bf16", bool, False, "bfloat16 autocast for forward passes"),
    Option("param_dtype", str, "float32", "the parameters' and gradients' precision; bfloat16: 2 + 2 bytes a parameter instead of 4 + 4, no float32 copy (each step computed in float32, stored rounded stochastically), forward passes under bfloat16 autocast", "DTYPE", choices=("float32", "bfloat16")),
    Option("step_in_backward", bool, False, "step each parameter inside the backward pass as soon as its gradient is ready, then free it: one gradient alive at a time (no --clip-grad-norm or --accumulation)"),
    Option("seed", int, 0, "seed of the data split, initialisation and sampling", "N", within="[0, inf)"),
    Option("device", str, "auto", "where to train: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps", "DEVICE", pattern=DEVICE_PATTERN),
    Option("threads", int, None, "torch CPU threads", "N", none_means="torch's own choice", within="[1, 4096]"),
    Option("strategy", str, "ddp", "how W > 1 processes (torchrun, --nproc) share the model", "NAME", choices=("ddp", "fsdp")),
    "output",
    Option("eval_every", int, None, "steps between validations", "N", none_means="once per epoch", within="[1, inf)"),
    Option("eval_size", int, 16384, "examples each evaluation reads at most, counted in tokens for text: the same evenly spaced subset of each split every time", "N", none_means="every example", within="[1, inf)"),
    Option("patience", int, None, "early stopping: validations without a lower validation loss", "N", none_means="no early stopping", within="[1, inf)"),
    Option("restore_best", bool, True, "end with the weights of the validation with the lowest loss (model.safetensors, the summary and predict use them; training itself continues to the budget)"),
    Option("log_every", int, None, "steps between logged metric rows", "N", none_means="about 200 rows per run", within="[1, inf)"),
    Option("checkpoint_every", int, None, "steps between checkpoints", "N", none_means="at each validation", within="[1, inf)"),
    Option("keep_checkpoints", int, 2, "checkpoints kept on disk (the newest)", "N", within="[1, inf)"),
    Option("progress", bool, True, "progress bar on a terminal, periodic lines otherwise"),
    Option("tensorboard", bool, False, "also log to TensorBoard (needs `pip install tensorboard`)"),
)

#: Every option of ``descend compare`` (and so of :class:`CompareSpec`, in this order).
COMPARE_OPTIONS: dict[str, Option] = _table(
    "training",
    Option("task", str, None, "task names, comma-separated, or 'all' (see --list)", "NAMES", none_means="the suite's tasks"),
    Option("suite", str, "quick", "quick (3 tasks, 3 seeds, minutes) or full (every task, 5 seeds)", "NAME", choices=("quick", "full")),
    "optimizer",
    Option("optimizers", str, None, "comma-separated optimizer names", "NAMES", none_means="the suite's"),
    "training",
    Option("seeds", int, None, "seeds per optimizer at its tuned learning rate", "N", none_means="3 (quick) or 5 (full)", within="[1, 1000]"),
    Option("tune_seeds", int, None, "seeds averaged per learning rate while tuning", "N", none_means="1 (quick) or 2 (full)", within="[1, 100]"),
    "optimizer",
    Option("grid", str, None, "multipliers of each optimizer's grid centre (a task's scaled default lr)", "M,M,...", none_means="0.316,1,3.16"),
    Option("max_extensions", int, 3, "grid points added beyond an edge while the best rate sits there", "N", within="[0, 20]"),
    "training",
    Option("steps", int, None, "optimizer steps of every run, overriding each task's budget (smoke tests)", "N", none_means="each task's own budget", within="[1, inf)"),
    Option("workers", int, 2, "processes running (task, optimizer) units in parallel, one thread each by default", "N", within="[1, 256]"),
    OPTIONS["device"],
    Option("threads", int, 1, "torch CPU threads per run (small models run fastest on one)", "N", none_means="torch's own choice", within="[1, 4096]"),
)

GROUPS = {
    "data": "data",
    "model": "model",
    "optimizer": "optimizer and schedule",
    "training": "training",
    "output": "evaluation and output",
}


def opt(name: str, table: dict[str, Option] = OPTIONS) -> Any:
    """The dataclass field of the option ``name`` of ``table``: its one default, help and validation."""
    option = table[name]
    return field(default=option.default, metadata={"option": option})


def options_dataclass(table: dict[str, Option]) -> Any:
    """A class decorator: the class as a dataclass with one field per option of ``table``, in order."""

    def decorate(cls: type) -> type:
        cls.__annotations__ = {name: _annotation(option) for name, option in table.items()}
        for name in table:
            setattr(cls, name, opt(name, table))
        return dataclass(cls)

    return decorate


def _annotation(option: Option) -> Any:
    return option.kind | None if option.nullable else option.kind


def option_of(f: Field[Any]) -> Option | None:
    """The :class:`Option` behind a dataclass field (``None`` for a field that is not an option)."""
    return f.metadata.get("option")


def check(name: str, value: Any) -> Any:
    """Validate ``value`` for the option ``name`` of :data:`OPTIONS` (see :meth:`Option.check`)."""
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


def option_fields(cls: type) -> list[tuple[Field[Any], Option]]:
    """``(field, option)`` for every option field of the dataclass ``cls``, in order."""
    return [(f, option) for f in fields(cls) if (option := option_of(f)) is not None]


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
    step's. ``param_dtype="bfloat16"``: the trainer casts the model's floating parameters and buffers to
    bfloat16 (no float32 copy; gradients are bfloat16 too) and runs forward passes under bfloat16
    autocast; descend's optimizers step such parameters in float32 and round them stochastically.
    Each field's default, range and meaning are those of :data:`OPTIONS` (the command line's
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
    param_dtype: str = opt("param_dtype")
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


@options_dataclass(OPTIONS)
class RunSpec:
    """Every option of ``descend train``: one field per row of :data:`OPTIONS`, in its order.

    That is the data, model and optimizer, every :class:`TrainConfig` field and where to run (``device``,
    ``threads``, ``strategy``). Each field is settable by flag, ``--config`` TOML or ``--set key=value``,
    with the default and validation of its row (the command-line reference lists them); constructing one
    validates it. ``config.json`` holds one key per field.
    """

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
        if self.strategy == "fsdp" and self.state_dtype == "int8":
            raise OptionError("--state-dtype int8 keeps a scale per block of 256 values of a parameter, which FSDP's "
                              "shards cut across: use --state-dtype bfloat16 with --strategy fsdp, or --strategy ddp")

    @property
    def resolved_lr(self) -> float:
        """``lr``, or the optimizer's default from :data:`DEFAULT_LR`."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` part (``gd`` trains on the full batch; ``steps`` overrides ``epochs``)."""
        values = {f.name: getattr(self, f.name) for f in fields(TrainConfig) if f.name in OPTIONS}
        if self.optimizer in FULL_BATCH:
            values["batch_size"] = None  # gd is SGD on the exact full-batch gradient
        if self.steps is not None:
            values["epochs"] = None
        return TrainConfig(**values)


@options_dataclass(COMPARE_OPTIONS)
class CompareSpec:
    """Every option of ``descend compare``: one field per row of :data:`COMPARE_OPTIONS`, in its order.

    Which tasks (workloads), optimizers, seeds and tuning grid. ``None`` means "the suite's default"
    (:data:`descend.train.SUITES` holds each suite's tasks, optimizers and seeds).
    """

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
