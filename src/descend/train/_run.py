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
from dataclasses import asdict, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

from descend import __version__
from descend import distributed as dd
from descend._options import OptionError, RunSpec, from_values
from descend.data.registry import load_data
from descend.train._build import build_model, make_optimizer
from descend.train._trainer import Trainer, seed_everything

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


class RunError(OptionError):
    """A run cannot start as asked; the message says what to change."""


_Spec = TypeVar("_Spec")


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with a help text (kept for older option dataclasses; new ones use
    :func:`descend._options.opt` / :func:`descend._options.define`)."""
    return field(default=default, metadata={"help": help})


def _spec_from_dict(cls: type[_Spec], values: dict[str, Any]) -> _Spec:
    """``cls(**values)`` for an options dataclass, with an error naming an unknown option."""
    return from_values(cls, values)  # type: ignore[no-any-return]


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


def prepare(spec: RunSpec, out_dir: Path | None = None) -> Trainer:
    """Data, model, optimizer and trainer for ``spec``; every bad choice is a :class:`RunError`."""
    spec.validate()
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
