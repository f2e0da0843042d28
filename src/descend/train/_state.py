"""The trainer's state on disk: save, resume (also from DCP), the best weights.

A checkpoint holds the model, the optimizer, the scheduler, the sampler, the global RNG and the
loop counters, so a resumed run continues bit for bit. Two formats, chosen by how the parameters
are stored, not by the world size:

- plain or DDP parameters: the main process writes one safetensors + JSON directory
  (:func:`descend.checkpoint.save_checkpoint`); the other ranks wait for it;
- FSDP2 (DTensor) parameters: every rank writes its shards with torch.distributed.checkpoint.

Either resumes at any world size and on any device: tensors are read to the CPU and copied onto
the trainer's device (the checkpoint records no device).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from descend import distributed as dd
from descend.checkpoint._distributed import load_checkpoint as load_sharded
from descend.checkpoint._distributed import save_checkpoint as save_sharded
from descend.checkpoint._local import (
    BackgroundSaver,
    CheckpointError,
    commit_checkpoint,
    is_sharded,
    latest_dir,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

__all__ = ["TrainerState", "best_weights", "load_best", "resume", "save", "trainer_state"]


class TrainerState(Protocol):
    """What a checkpoint reads from and restores into a :class:`~descend.train.Trainer`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any
    early_stopping: Any
    config: Any
    out_dir: Path | None
    is_main: bool
    step: int
    seconds: float
    val_loss_start: float | None
    last_checkpoint: Path | None
    resumed: bool

#: What loading a checkpoint into a model or optimizer it does not fit raises.
MISMATCH_ERRORS = (KeyError, ValueError, RuntimeError, TypeError)


def trainer_state(trainer: TrainerState) -> dict[str, Any]:
    """Everything but the model's tensors (and, for DCP, the optimizer's) that a resume needs."""
    es = trainer.early_stopping
    return {
        "step": trainer.step,
        "seconds": trainer.seconds,
        "best_val_loss": es.best,
        "best_step": es.best_step,
        "evals_without_improvement": es.bad,
        "stopped_early": es.stopped,
        "val_loss_start": trainer.val_loss_start,
        "optimizer_class": type(trainer.optimizer).__name__,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "sampler_class": type(trainer.sampler).__name__,
        "sampler": trainer.sampler.state_dict(),
        "rng": rng_state(),
        "config": trainer.config.to_dict(),
    }


def _sharded(trainer: TrainerState) -> bool:
    return any(isinstance(p, DTensor) for p in trainer.model.parameters())


def _weights_state(trainer: TrainerState) -> dict[str, Any]:
    """What a weights-only checkpoint (the best weights) records besides the model's tensors."""
    es = trainer.early_stopping
    return {"step": trainer.step, "best_val_loss": es.best, "best_step": es.best_step,
            "config": trainer.config.to_dict()}


def save(trainer: TrainerState, root: Path, *, keep: int, sharded: bool | None = None,
         weights_only: bool = False, background: BackgroundSaver | None = None) -> Path:
    """Write a checkpoint of ``trainer`` under ``root`` (``root/step-N``, ``root/latest.json``); every rank calls it.

    ``sharded`` forces the format (default: DCP exactly when the parameters are FSDP2 DTensors).
    ``weights_only``: the model's tensors and the step, no optimizer, sampler or RNG state (enough
    for :func:`load_best`, not for :func:`resume`). ``background``: a one-process, unsharded
    checkpoint is copied now and written by that saver while training goes on (call its ``wait``
    before reading it). Otherwise returns once every rank is done, so a rank that fails afterwards
    cannot cut it short.
    """
    sharded = _sharded(trainer) if sharded is None else sharded
    state = _weights_state(trainer) if weights_only else trainer_state(trainer)
    if not sharded:
        path = root / f"step-{trainer.step:08d}"
        model_state = dd.unwrap(trainer.model).state_dict()
        if background is not None and dd.world_size() == 1:
            return background.submit(root, trainer.step, model_state, state, keep=keep)
        if background is not None:
            background.wait()
        if trainer.is_main:
            path = save_checkpoint(root, trainer.step, model_state, state, keep=keep)
        dd.barrier()
        return path
    if background is not None:
        background.wait()
    name = f"step-{trainer.step:08d}"
    path = root / name
    if trainer.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # left by a run that died while writing it
            shutil.rmtree(path)
    dd.barrier()
    state.pop("optimizer", None)  # DCP writes the (sharded) optimizer state itself
    save_sharded(path, trainer.model, None if weights_only else trainer.optimizer, extra=state)  # ends with a barrier
    if trainer.is_main:
        commit_checkpoint(root, trainer.step, name, keep=keep, kind="dcp")
    return path


def _check_classes(trainer: TrainerState, state: dict[str, Any], path: Path) -> None:
    for what, mine in (
        ("optimizer_class", type(trainer.optimizer).__name__),
        ("sampler_class", type(trainer.sampler).__name__),
    ):
        if state.get(what) != mine:
            raise CheckpointError(
                f"checkpoint {path} was written with {what.split('_')[0]} {state.get(what)}, not {mine}"
            )


def _load(trainer: TrainerState, root: Path, *, optimizer: bool = True) -> tuple[dict[str, Any], Path]:
    """Load the checkpoint at ``root`` into the model (and optimizer); return its state and directory."""
    directory = latest_dir(root)
    opt = trainer.optimizer if optimizer else None
    if is_sharded(directory):
        try:
            state = load_sharded(directory, trainer.model, opt)
        except MISMATCH_ERRORS as e:
            raise CheckpointError(
                f"checkpoint {directory} does not match this run "
                f"(resume with the same model and optimizer options): {e}"
            ) from e
        return state, directory
    ckpt = load_checkpoint(root)
    mine = {k: tuple(v.shape) for k, v in dd.unwrap(trainer.model).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt.model.items()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written for a different model (parameters differ, e.g. {diff}); "
            "resume with the same model options"
        )
    if optimizer:
        _check_classes(trainer, ckpt.state, ckpt.path)
    try:
        optimizer_state = (
            _restore_tuples(ckpt.state["optimizer"], trainer.optimizer.state_dict()) if optimizer else None
        )
        dd.load_full_state(trainer.model, opt, ckpt.model, optimizer_state)
    except MISMATCH_ERRORS as e:
        raise CheckpointError(f"checkpoint {ckpt.path} does not match this run: {e}") from e
    return ckpt.state, ckpt.path


def resume(trainer: TrainerState, path: str | Path | None = None) -> int:
    """Load the latest checkpoint (``path`` or ``out_dir/checkpoint``) into ``trainer``; return its step.

    Raises :class:`~descend.checkpoint.CheckpointError` if it is corrupt or was written for another
    model, optimizer or sampling scheme.
    """
    if path is None:
        if trainer.out_dir is None:
            raise CheckpointError("resume() needs a checkpoint path or a trainer with out_dir")
        path = trainer.out_dir / "checkpoint"
    state, directory = _load(trainer, Path(path))
    _check_classes(trainer, state, directory)
    try:
        if trainer.scheduler is not None and state["scheduler"] is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.sampler.load_state_dict(state["sampler"])
    except MISMATCH_ERRORS as e:
        raise CheckpointError(f"checkpoint {directory} does not match this run: {e}") from e
    set_rng_state(state["rng"])
    trainer.step, trainer.seconds = int(state["step"]), float(state["seconds"])
    trainer.early_stopping.load_state_dict(
        {
            "best": state["best_val_loss"],
            "best_step": state.get("best_step", 0),
            "bad": state["evals_without_improvement"],
            "stopped": state["stopped_early"],
        }
    )
    start = state.get("val_loss_start")
    trainer.val_loss_start = None if start is None else float(start)
    trainer.last_checkpoint, trainer.resumed = directory, True
    return trainer.step


def best_weights(trainer: TrainerState) -> dict[str, Tensor]:
    """A copy of the model's tensors (this rank's shards under FSDP2), on its device."""
    return {k: v.detach().clone() for k, v in dd.unwrap(trainer.model).state_dict().items()}


def load_best(trainer: TrainerState, weights: dict[str, Tensor] | None) -> bool:
    """Put the best weights back: from memory, else from ``out_dir/best``; False when neither exists."""
    if weights is not None:
        dd.unwrap(trainer.model).load_state_dict(weights)
        return True
    if trainer.out_dir is not None and (trainer.out_dir / "best" / "latest.json").is_file():
        _load(trainer, trainer.out_dir / "best", optimizer=False)
        return True
    return False


def _restore_tuples(saved: Any, current: Any) -> Any:
    """JSON turns tuples (e.g. ``betas``) into lists; give them back the type the live optimizer uses."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return {k: _restore_tuples(v, current.get(k)) for k, v in saved.items()}
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [_restore_tuples(a, b) for a, b in zip(saved, current)]
    if isinstance(saved, list) and isinstance(current, tuple):
        return tuple(saved)
    return saved
