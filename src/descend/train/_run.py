"""A complete run: data, model, optimizer, trainer and the files it leaves in its output directory.

``run_training(spec, out_dir)`` writes::

    out_dir/config.json        the RunSpec (plus the descend version)
    out_dir/metrics.jsonl      one JSON object per logged step; metrics.csv, the same as a table
    out_dir/checkpoint/        the resumable state (see descend.train._checkpoint)
    out_dir/model.safetensors  the final weights
    out_dir/summary.json       {"train": {...}, "val": {...}, "test": {...}, "steps": ..., "seconds": ...}

Under ``torchrun`` (``W > 1`` processes) the same call is one rank of a data-parallel run: it
joins the process group (gloo: the trainer computes on the CPU), wraps the model with
``spec.strategy`` (DDP or FSDP2), and only rank 0 writes files other than checkpoint shards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

from descend import __version__
from descend import distributed as dd
from descend.data.registry import load_data
from descend.train._build import FULL_BATCH, build_model, make_optimizer
from descend.train._trainer import TrainConfig, Trainer, seed_everything

__all__ = ["RUN_FILES", "RunError", "RunSpec", "check_out_dir", "run_training"]

#: What a run writes in its directory (and what ``overwrite`` removes; nothing else is touched).
RUN_FILES = (
    "config.json",
    "summary.json",
    "metrics.jsonl",
    "metrics.csv",
    "model.safetensors",
    "checkpoint",
    "tensorboard",
    "report.html",
    "results.csv",
)


class RunError(ValueError):
    """A run cannot start as asked; the message says what to change."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


_Spec = TypeVar("_Spec")


def _spec_from_dict(cls: type[_Spec], values: dict[str, Any]) -> _Spec:
    """``cls(**values)`` for an options dataclass, with a :class:`RunError` naming an unknown option."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise RunError(f"unknown option {unknown[0]!r}; valid options are {', '.join(sorted(known))}")
    return cls(**values)


@dataclass
class RunSpec:
    """Every option of ``descend train`` (each settable by flag, ``--config`` TOML or ``--set key=value``)."""

    data: str = _opt("digits", "dataset: digits, digits-points, shapes, gp1d, or a .csv/.npz path")
    target: str | None = _opt(None, "label column of a CSV file")
    task: str | None = _opt(None, "classification or regression (default: inferred from the target)")
    model: str = _opt("mlp", "linear, mlp, resmlp or pointset")
    depth: int = _opt(2, "hidden layers (mlp), residual blocks (resmlp) or attention blocks (pointset)")
    width: int = _opt(128, "hidden width")
    activation: str = _opt("relu", "relu, tanh, sigmoid or gelu")
    optimizer: str = _opt("adam", "gd, sgd, momentum, signsgd, signum, softsign, lion, adam or adamw")
    lr: float | None = _opt(None, "learning rate (default: a per-optimizer value, see `descend optimizers`)")
    weight_decay: float | None = _opt(None, "optimizer weight decay (default: the optimizer's own)")
    l2: float = _opt(1e-3, "L2 penalty λ in the loss: loss + λ/2·||w||²")
    epochs: float | None = _opt(30.0, "passes over the training set (ignored when --steps is set)")
    steps: int | None = _opt(None, "optimizer steps (overrides --epochs)")
    batch_size: int | None = _opt(32, "examples per step; 'full' for full-batch gradient descent")
    replacement: bool = _opt(False, "sample minibatches with replacement instead of reshuffling each epoch")
    accumulation: int = _opt(1, "minibatches whose gradients are averaged per step")
    chunk_size: int | None = _opt(None, "examples per forward pass in full-batch mode (bounds memory)")
    schedule: str = _opt("constant", "LR schedule: constant, cosine, linear or step")
    warmup_steps: int = _opt(0, "linear LR warm-up steps")
    min_lr_factor: float = _opt(0.0, "final LR / initial LR for cosine and linear schedules")
    step_size: int = _opt(1000, "steps between LR drops of the step schedule")
    gamma: float = _opt(0.1, "LR factor per drop of the step schedule")
    clip_grad_norm: float | None = _opt(None, "clip the gradient's global norm to this value")
    bf16: bool = _opt(False, "bfloat16 autocast for forward passes")
    eval_every: int | None = _opt(None, "steps between validations (default: once per epoch)")
    log_every: int | None = _opt(None, "steps between logged metric rows (default: ~200 rows per run)")
    checkpoint_every: int | None = _opt(None, "steps between checkpoints (default: at each validation)")
    patience: int | None = _opt(None, "early stopping: validations without a lower validation loss")
    seed: int = _opt(0, "seed of the data split, initialisation and sampling")
    progress: bool = _opt(True, "progress bar on a terminal / periodic lines otherwise")
    tensorboard: bool = _opt(True, "also log to TensorBoard when it is installed")
    threads: int | None = _opt(None, "torch CPU threads (default: torch's own choice)")
    strategy: str = _opt("ddp", "how W > 1 processes (torchrun, --nproc) share the model: ddp or fsdp")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        return _spec_from_dict(cls, values)

    def validate(self) -> None:
        """Raise :class:`RunError` naming the first option out of range."""
        _validate(self)

    def train_config(self) -> TrainConfig:
        shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(self)}
        config = TrainConfig(**{k: getattr(self, k) for k in shared})
        if self.optimizer in FULL_BATCH:
            config.batch_size = None  # gd is SGD on the exact full-batch gradient
        if self.steps is not None:
            config.epochs = None
        return config


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a directory that holds another run, unless ``overwrite`` (then remove its run files only)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out {out_dir} is a file; give a directory")
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if present and not overwrite:
        raise RunError(
            f"{out_dir} already holds a run ({present[0]}); pass --overwrite to replace it, "
            "--resume to continue it, or choose another --out"
        )
    for name in present:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _validate(spec: RunSpec) -> None:
    checks = [
        (spec.steps is None or spec.steps >= 1, f"--steps must be >= 1, got {spec.steps}"),
        (spec.epochs is None or spec.epochs > 0, f"--epochs must be > 0, got {spec.epochs}"),
        (spec.steps is not None or spec.epochs is not None, "give --steps or --epochs"),
        (
            spec.batch_size is None or spec.batch_size >= 1,
            f"--batch-size must be >= 1 or 'full', got {spec.batch_size}",
        ),
        (spec.l2 >= 0, f"--l2 must be >= 0, got {spec.l2}"),
        (spec.lr is None or spec.lr > 0, f"--lr must be > 0, got {spec.lr}"),
        (spec.depth >= 0 and spec.width >= 1, f"--depth must be >= 0 and --width >= 1, got {spec.depth}, {spec.width}"),
        (spec.accumulation >= 1, f"--accumulation must be >= 1, got {spec.accumulation}"),
        (spec.strategy in ("ddp", "fsdp"), f"--strategy must be ddp or fsdp, got {spec.strategy!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise RunError(message)


def prepare(spec: RunSpec, out_dir: Path | None = None) -> Trainer:
    """Data, model, optimizer and trainer for ``spec``; every bad choice is a :class:`RunError`."""
    _validate(spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    seed_everything(spec.seed)
    bundle = load_data(spec.data, target=spec.target, task=spec.task, seed=spec.seed)  # type: ignore[arg-type]
    try:
        model = build_model(spec.model, bundle, depth=spec.depth, width=spec.width, activation=spec.activation)
        if dd.world_size() > 1:  # every rank built the same model from the same seed
            model = dd.wrap(model, spec.strategy)
        optimizer = make_optimizer(spec.optimizer, model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        return Trainer(model, optimizer, bundle, spec.train_config(), out_dir=out_dir, is_main=dd.is_main())
    except ValueError as e:
        raise RunError(str(e)) from e


def run_training(
    spec: RunSpec, out_dir: str | Path, *, overwrite: bool = False, resume: bool = False
) -> dict[str, Any]:
    """Train as ``spec`` says, writing the run's files to ``out_dir``; return the summary.

    ``resume=True`` continues the run already in ``out_dir`` from its latest checkpoint (``spec``
    should be its ``config.json``, possibly with more ``steps``/``epochs``), whatever the world
    size that wrote it. Launched by torchrun, every rank calls this with the same arguments.
    """
    joined = dd.launched() and not dd.is_distributed()
    if joined:
        dd.setup("gloo")  # the trainer keeps data and model on the CPU
    out_dir = Path(out_dir)
    main = dd.is_main()
    if not resume:
        _on_main(lambda: check_out_dir(out_dir, overwrite))
    trainer = prepare(spec, out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dd.barrier()
    if resume:
        trainer.resume()
    if main:
        _write_json(out_dir / "config.json", {"descend_version": __version__, **asdict(spec)})
    summary = trainer.fit()
    if trainer.world > 1:
        weights = dd.full_state_dict(trainer.model)  # every rank helps gather; rank 0 gets them
    else:
        # clones: safetensors refuses tensors that share storage (tied weights, flat=True optimizers)
        weights = {k: v.detach().contiguous().clone() for k, v in trainer.model.state_dict().items()}
    if main:
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".model.", suffix=".safetensors")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp)
        os.replace(tmp, out_dir / "model.safetensors")
        _write_json(out_dir / "summary.json", summary)
    if joined:
        dd.teardown()
    return summary


def _on_main(check: Any) -> None:
    """Run ``check()`` on rank 0 only; a :class:`RunError` it raises is raised on every rank."""
    error = None
    if dd.is_main():
        try:
            check()
        except RunError as e:
            error = str(e)
    error = dd.broadcast_object(error)
    if error is not None:
        raise RunError(error)


def load_run_spec(out_dir: str | Path) -> RunSpec:
    """The :class:`RunSpec` saved in ``out_dir/config.json`` (to resume that run)."""
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"--resume {out_dir}: no run there (config.json is missing); start one with --out")
    try:
        values = json.loads(path.read_text())
    except ValueError as e:
        raise RunError(f"--resume {out_dir}: config.json is not valid JSON ({e})") from e
    values.pop("descend_version", None)
    return RunSpec.from_dict(values)
