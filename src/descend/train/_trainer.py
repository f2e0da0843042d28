"""The training loop: one explicit function, :meth:`Trainer.fit`, for every device, world size and data source.

Each optimizer step minimises the size-weighted mean loss of its micro-batches plus ``λ/2·||w||²``
(:mod:`descend.train._step`); every ``eval_every`` steps the model is evaluated on the validation
split (:mod:`descend.train._evaluate`) and every ``checkpoint_every`` steps the whole state is saved
(:mod:`descend.train._state`), so :meth:`Trainer.resume` continues a run bit for bit.

Under ``torchrun`` (``W`` processes, model wrapped by :func:`descend.distributed.wrap`) the same loop
is data parallel: every rank draws the same global micro-batches and keeps its share; DDP/FSDP2
average the gradients, so each step is the one-process step. At ``W = 1`` the share is the whole
micro-batch and every collective a no-op: there is no second code path. Rank 0 (``is_main``) writes
metrics, progress and files; every rank runs evaluations and (FSDP2) writes its checkpoint shards.

Overfitting is not divergence: a run diverges when its loss becomes NaN/inf or its validation loss
grows to ``DIVERGENCE_FACTOR`` times where it started; a validation loss that rises while the training
loss falls is overfitting, and ``restore_best`` (the default) ends the run with the weights of its
lowest validation loss.

Test hook: ``DESCEND_FAIL_AT_STEP=k`` (with ``DESCEND_FAIL_RANK=r``, default 0) makes rank ``r``
raise before step ``k``; the tests use it to kill one rank of a job. Leave both unset.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from descend import distributed as dd
from descend._options import TrainConfig
from descend._random import seed_everything
from descend.checkpoint._local import BackgroundSaver
from descend.nn._size import physical_memory
from descend.train._callbacks import check_callbacks, run_callbacks
from descend.train._data import LoaderSource, Source, as_sources, first_targets, infer_task
from descend.train._device import cast_model, place_model, resolve_device
from descend.train._evaluate import EarlyStopping, Metric, diverged, evaluate
from descend.train._losses import LossFn, get_loss
from descend.train._output import MetricsWriter, Progress
from descend.train._sampling import FullBatch, Minibatch, Sampler, Stream
from descend.train._schedule import Schedule
from descend.train._state import best_weights, load_best, resume, save
from descend.train._step import NonFiniteLossError, accumulate_gradient, clear_grads, optimizer_step

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "accumulate_gradient", "make_sampler", "seed_everything"]


def make_sampler(source: Source, config: TrainConfig) -> Sampler:
    """The sampler ``config`` asks for over ``source``: a loader's own batches, full batch, or minibatches."""
    if isinstance(source, LoaderSource):
        return Stream(source.loader, config.accumulation)
    assert source.n is not None
    if config.batch_size is None:
        return FullBatch(source.n, config.chunk_size)
    return Minibatch(
        source.n, config.batch_size, seed=config.seed, replacement=config.replacement, accumulation=config.accumulation
    )


#: Tokens an evaluation passes through the model at once (a tabular or point-set example counts one).
EVAL_CHUNK_TOKENS = 4096


def _tokens_per_example(source: Source, task: str) -> int:
    """Tokens in one example: a classification target per position (``[M, T]``) is a sequence of ``T``."""
    targets = first_targets(source)
    return int(targets[0].numel()) if task == "classification" and targets.dim() == 2 and len(targets) else 1


def _check_step_in_backward(config: TrainConfig, sampler: Sampler, world: int) -> None:
    """Refuse, in one line, what cannot run with the step inside the backward pass (it needs every gradient)."""
    if config.clip_grad_norm is not None:
        why = "clipping by the global norm needs every gradient at once; drop clip_grad_norm"
    elif config.accumulation > 1 or (isinstance(sampler, FullBatch) and len(sampler.chunks) > 1):
        why = "a step over several micro-batches (accumulation, or chunk_size below the training set) needs " \
              "their gradients summed first; use one micro-batch per step"
    elif world > 1:
        why = "data parallelism averages gradients across processes after the backward pass; train on one process"
    else:
        return
    raise ValueError(f"step_in_backward: {why}")


def _fail_hook() -> tuple[int, int] | None:
    """``(step, rank)`` from ``DESCEND_FAIL_AT_STEP``/``DESCEND_FAIL_RANK`` (a test hook), else None."""
    step = os.environ.get("DESCEND_FAIL_AT_STEP")
    if not step:
        return None
    return int(step), int(os.environ.get("DESCEND_FAIL_RANK", "0"))


class Trainer:
    """Trains ``model`` on ``data``'s train split with ``optimizer``, evaluating on its val split.

    >>> trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-3), bundle, TrainConfig(epochs=10))
    >>> summary = trainer.fit()      # {"train": {...}, "val": {...}, "test": {...}, "steps": ..., ...}

    Args:
        data: a :class:`~descend.data.DataBundle`; or ``{"train": ..., "val": ..., "test": ...}`` (val and
            test optional) whose values are each a ``Split``, a map-style ``Dataset`` or a ``DataLoader``;
            or one of those alone (the train split). See :mod:`descend.train._data`.
        device: ``None``/``"auto"`` (CUDA if available, else CPU; ``cuda:LOCAL_RANK`` under torchrun),
            ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``; a device this machine lacks is a ``ValueError``.
        loss_fn: ``(outputs, targets) -> mean loss``; default from ``config.loss`` and the task.
        task: ``"classification"`` or ``"regression"``; default the bundle's, else inferred from the
            training targets' dtype (integers: classification).
        metrics: extra ``{"name": fn(outputs, targets)}`` evaluated on each split (per-example tensor or
            batch mean), reported beside the defaults (accuracy; or RMSE in the target's original
            units and R²).
        callbacks: objects with any of ``on_step_end``, ``on_validation_end``, ``on_fit_end``.
        scheduler: any torch LR scheduler (stepped once per optimizer step); default from ``config.schedule``.
        out_dir: write ``metrics.jsonl``, ``metrics.csv``, ``checkpoint/`` (and ``best/`` with early stopping).
        is_main: whether this process writes files (default: rank 0).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: Any, config: TrainConfig | None = None,
                 *, loss_fn: LossFn | None = None, scheduler: Any = None, out_dir: str | Path | None = None,
                 is_main: bool | None = None, device: str | torch.device | None = None, task: str | None = None,
                 metrics: Mapping[str, Metric] | None = None, callbacks: Iterable[Any] = ()) -> None:
        self.config = cfg = config or TrainConfig()
        self.world = dd.world_size()
        if self.world > 1:
            dd.check_wrapped(model)
        self.device = resolve_device(device)
        place_model(model, optimizer, self.device)
        if cfg.param_dtype == "bfloat16":  # no float32 copy: the forward passes run under bf16 autocast
            cast_model(model, torch.bfloat16)
        self.bf16_autocast = cfg.bf16 or cfg.param_dtype == "bfloat16"
        self.model, self.optimizer, self.data = model, optimizer, data
        self.sources = as_sources(data)
        self.task = task or infer_task(data, self.sources)
        self.loss_fn = loss_fn or get_loss(cfg.loss, self.task)
        self.metrics = dict(metrics or {})
        self.callbacks = check_callbacks(callbacks)
        info = getattr(data, "info", None) or {}  # regression metrics in the target's original units
        self.target_std = getattr(data, "target_std", None)
        self.target_std = info.get("target_std") if self.target_std is None else self.target_std
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.is_main = dd.is_main() if is_main is None else is_main
        self.sampler = make_sampler(self.sources["train"], cfg)
        self.example_tokens = _tokens_per_example(self.sources["train"], self.task)
        per_epoch = self.sampler.steps_per_epoch
        self.total_steps = int(cfg.steps) if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
        if self.total_steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.total_steps}")
        self.eval_every = cfg.eval_every or (per_epoch if per_epoch > 1 else max(1, self.total_steps // 50))
        self.log_every = cfg.log_every or max(1, self.total_steps // 200)
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        self.schedule = Schedule(
            cfg.schedule, self.total_steps, cfg.warmup_steps, cfg.min_lr_factor, cfg.step_size, cfg.gamma
        )
        if scheduler is None and not self.schedule.is_constant:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        self.scheduler = scheduler
        if cfg.step_in_backward:
            _check_step_in_backward(cfg, self.sampler, self.world)
        self._in_backward: Any = None  # the hooks of descend.optim.step_in_backward while fit() runs
        self.step, self.seconds = 0, 0.0
        self.early_stopping = EarlyStopping(cfg.patience)
        # the weights of the lowest validation loss are kept (in memory, and in out_dir/best for a resume)
        # when the run ends with them (restore_best) or may stop early (patience)
        self.keeps_best = cfg.restore_best or cfg.patience is not None
        self.weights_step: int | None = None  # the step whose weights the model ends with, when not the last
        self.val_loss_start: float | None = None
        self.diverged, self.should_stop = False, False
        self.stop_reason: str | None = None  # set when the run stops because it diverged
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self.resumed = False
        self._best: dict[str, Tensor] | None = None
        # one process writes its checkpoints in the background (one saver per directory), when a copy of
        # the training state takes at most an eighth of the machine's memory
        self._savers: dict[str, BackgroundSaver] | None = None
        self._writer: MetricsWriter | None = None
        self._progress: Progress | None = None
        self._fail_at = _fail_hook()

    # ---- the loop --------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``config`` says stop (or ``max_steps`` total steps, to pause a run); return the summary."""
        cfg = self.config
        stop_at = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        if self.is_main and self.out_dir is not None:
            self._writer = MetricsWriter(self.out_dir, self.step if self.resumed else None, cfg.tensorboard)
        if self.is_main and cfg.progress:
            self._progress = Progress(self.total_steps, self.step)
        if self.val_loss_start is None and "val" in self.sources and self.step == 0:
            self.val_loss_start = self.evaluate("val")["loss"]  # where the run starts, for the divergence check
        self.should_stop = self.should_stop or self.early_stopping.stopped
        has_val, last = "val" in self.sources, self.total_steps
        started = time.perf_counter() - self.seconds
        if cfg.step_in_backward:
            from descend.optim import step_in_backward

            clear_grads(self.optimizer)
            self._in_backward = step_in_backward(self.optimizer, l2=cfg.l2)
        try:
            while self.step < stop_at and not self.should_stop:
                step = self.step + 1
                if self._fail_at is not None and self._fail_at == (step, dd.rank()):
                    raise RuntimeError(f"injected failure at step {step} (DESCEND_FAIL_AT_STEP test hook)")
                row = self.train_step(measure=step % self.log_every == 0 or step == last)
                self.step = step
                if has_val and (step % self.eval_every == 0 or step == last):
                    row.update(self.validate())
                self.seconds = time.perf_counter() - started
                if row or self._progress is not None:
                    self.log(row)
                if self.callbacks:
                    run_callbacks(self.callbacks, "on_step_end", self, row)
                if self.diverged:
                    break  # keep the last checkpoint: it is the last good one
                if self.out_dir is not None and (
                    self.step % self.checkpoint_every == 0 or self.step == stop_at or self.should_stop
                ):
                    self.save_checkpoint()
        finally:
            self.close()
        es = self.early_stopping
        finished = self.step >= self.total_steps or es.stopped or self.diverged  # not paused by max_steps
        restored = False
        if finished and self.keeps_best and 0 < es.best_step != self.step:
            restored = load_best(self, self._best)
            if restored:
                self.weights_step = es.best_step
        if es.stopped:
            kept = "; restored the best weights" if restored else ""
            self.say(f"early stopping at step {self.step}: {es.reason()}{kept}")
        elif restored:
            self.say(
                f"kept the weights of step {es.best_step} (the lowest validation loss, {es.best:.4g}) "
                f"rather than those of the last step, {self.step}"
            )
        summary = self.summary()
        run_callbacks(self.callbacks, "on_fit_end", self, summary)
        return summary

    def train_step(self, measure: bool = False) -> dict[str, Any]:
        """One optimizer step on the sampler's next micro-batches; the step's metrics when ``measure``."""
        cfg = self.config
        try:
            row = optimizer_step(
                self.model, self.optimizer, self.scheduler, self.loss_fn, self.sources["train"],
                self.sampler.next_step(), l2=cfg.l2, clip_grad_norm=cfg.clip_grad_norm, bf16=self.bf16_autocast,
                device=self.device, measure=measure, classify=self.task == "classification",
                in_backward=self._in_backward is not None,
            )  # fmt: skip
        except NonFiniteLossError as e:
            loss = getattr(e, "loss", math.nan)
            self.log({"step": self.step + 1, "loss": loss}, stamp=False)
            where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            raise NonFiniteLossError(
                f"the loss became {loss} at step {self.step + 1}{where}; lower the learning rate or set clip_grad_norm"
            ) from None
        return row if measure else {}

    def evaluate(self, split: str | Any, chunk_size: int | None = None, *, whole: bool = False) -> dict[str, float]:
        """Mean loss and metrics of the model on ``split`` (a name, or a ``Split``/``Dataset``/``DataLoader``).

        At most ``config.eval_size`` tokens are read (an example of a token sequence counts its tokens,
        any other example one): the same evenly spaced examples every time; ``whole`` reads them all.
        ``chunk_size`` examples go through the model at once (default: 4,096 tokens' worth), so an
        evaluation holds less in memory than a training step of as many tokens.
        """
        source = self.sources[split] if isinstance(split, str) else as_sources(split)["train"]
        tokens = self.example_tokens
        size = None if whole else self.config.eval_size
        return evaluate(
            self.model, self.loss_fn, source, task=self.task, metrics=self.metrics,
            chunk_size=chunk_size or max(1, EVAL_CHUNK_TOKENS // tokens),
            limit=None if size is None else max(1, math.ceil(size / tokens)),
            bf16=self.bf16_autocast, device=self.device, target_std=self.target_std,
        )  # fmt: skip

    def validate(self) -> dict[str, float]:
        """Evaluate on the validation split; update early stopping, the best weights and the divergence check."""
        metrics = self.evaluate("val")
        loss = metrics["loss"]
        if self.early_stopping.update(loss, self.step) and self.keeps_best:
            self._best = best_weights(self)
            if self.out_dir is not None:
                save(self, self.out_dir / "best", keep=1, weights_only=True, background=self._saver("best"))
        if self.early_stopping.stopped:
            self.should_stop = True
        if diverged(self.val_loss_start, loss):
            self.diverged = self.should_stop = True
            self.stop_reason = f"diverged: the validation loss rose from {self.val_loss_start:.4g} to {loss:.4g}"
            kept = f" (the last good checkpoint is {self.last_checkpoint})" if self.last_checkpoint else ""
            self.warn(
                f"the validation loss rose from {self.val_loss_start:.4g} to {loss:.4g} at step {self.step}: the run "
                f"diverged and stopped; lower the learning rate{kept}"
            )
        row = {f"val_{k}": v for k, v in metrics.items()}
        run_callbacks(self.callbacks, "on_validation_end", self, row)
        return row

    def summary(self) -> dict[str, Any]:
        """Loss and metrics on each split, the steps and epochs taken, and how the run ended.

        The metrics are those of the weights the model ends with: the step ``weights_step`` (the
        ``best_step`` of the lowest validation loss when ``restore_best`` or early stopping put them back).
        """
        out: dict[str, Any] = {name: self.evaluate(name) for name in ("train", "val", "test") if name in self.sources}
        out.update(
            steps=self.step,
            epochs=self.sampler.epoch,
            seconds=self.seconds,
            weights_step=self.step if self.weights_step is None else self.weights_step,
            stopped_early=self.early_stopping.stopped,
            diverged=self.diverged,
            val_loss_start=self.val_loss_start,
        )
        if self.early_stopping.best_step > 0:
            out.update(best_step=self.early_stopping.best_step, best_val_loss=self.early_stopping.best)
        if self.early_stopping.stopped:
            out.update(stop_reason=self.early_stopping.reason())
        elif self.stop_reason is not None:
            out.update(stop_reason=self.stop_reason)
        return out

    # ---- output ----------------------------------------------------------------------------
    def log(self, row: dict[str, Any], *, stamp: bool = True) -> None:
        """Record a row of metrics (main process only): history, files, progress."""
        if not self.is_main:
            return
        if not row:
            if self._progress is not None:
                self._progress.update(self.step)
            return
        if stamp:
            row = {"step": self.step, "epoch": self.sampler.epoch, "seconds": self.seconds, **row}
        else:
            row = {**row, "epoch": self.sampler.epoch}
        self.history.append(row)
        if self._writer is not None:
            self._writer.write(row)
        if self._progress is not None:
            self._progress.update(self.step, row)

    def say(self, message: str) -> None:
        """Print a line about the run (main process, when progress output is on)."""
        if self.is_main and self.config.progress:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        """Print a warning line to stderr (main process), whatever the progress setting."""
        if self.is_main:
            print(f"descend: warning: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """End what :meth:`fit` started: remove the in-backward hooks, finish the checkpoints being written
        and close the metrics file and progress bar."""
        try:
            for saver in (self._savers or {}).values():
                saver.wait()
        finally:
            self._close_outputs()

    def _close_outputs(self) -> None:
        if self._in_backward is not None:
            self._in_backward.remove()
            self._in_backward = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, *, sharded: bool | None = None) -> Path | None:
        """Write the full training state to ``out_dir/checkpoint`` (every rank calls it); see :mod:`._state`."""
        if self.out_dir is None:
            return None
        self.last_checkpoint = save(
            self, self.out_dir / "checkpoint", keep=self.config.keep_checkpoints, sharded=sharded,
            background=self._saver("checkpoint"),
        )
        return self.last_checkpoint

    def _saver(self, name: str) -> BackgroundSaver | None:
        """The background saver of ``out_dir/name``, or None where checkpoints are written in the foreground:
        several processes, or a training state whose copy would take over an eighth of the memory."""
        if self._savers is None:
            state = [*self.model.parameters(), *self.model.buffers()]
            state += [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
            size = sum(t.numel() * t.element_size() for t in state)
            memory = physical_memory()
            fits = self.world == 1 and memory is not None and size <= memory // 8
            self._savers = {"checkpoint": BackgroundSaver(), "best": BackgroundSaver()} if fits else {}
        return self._savers.get(name)

    def resume(self, path: str | Path | None = None) -> int:
        """Load the latest checkpoint (``path`` or ``out_dir/checkpoint``); return the step it resumes at.

        Raises :class:`~descend.train.CheckpointError` if it is corrupt or was written for another
        model, optimizer or sampling scheme.
        """
        for saver in (self._savers or {}).values():
            saver.wait()
        return resume(self, path)
