"""The training loop: one explicit function, :meth:`Trainer.fit`, with a few named hooks.

One optimizer step, with micro-batches ``B_1 .. B_k`` of sizes ``m_j`` from the sampler
(``M = Σ m_j``; full batch: the chunks of the whole training set), minimises

    L(w) = Σ_j (m_j / M) · mean_{i ∈ B_j} ℓ(f_w(x_i), y_i)  +  λ/2 · ||w||²

(``λ = config.l2``; weight decay, if any, lives in the optimizer), then optionally clips
``||∇L||`` and lets the optimizer move ``w``.

Hooks a subclass (e.g. a DDP/FSDP trainer launched by ``torchrun``) overrides:

- :meth:`Trainer.reduce_metrics`: combine per-process sums before they are reported
  (``dist.all_reduce``); identity here.
- :meth:`Trainer.on_log`: where a row of metrics goes; only called on the main process.
- ``is_main``: rank 0 writes metrics, progress and checkpoints; other ranks only compute.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from descend.data._base import DataBundle, Split
from descend.train._checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from descend.train._losses import LossFn, get_loss, l2_penalty
from descend.train._output import MetricsWriter, Progress
from descend.train._sampling import Batch, FullBatch, Minibatch, Sampler
from descend.train._schedule import Schedule

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "accumulate_gradient", "seed_everything"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the parameters are those of the last finite step."""


@dataclass
class TrainConfig:
    """Everything that decides how a model is trained (not what model, data or optimizer).

    Length: ``steps`` optimizer steps, or else ``epochs`` passes over the training set.
    Sampling: ``batch_size=None`` is full-batch gradient descent (``chunk_size`` bounds the examples
    per forward pass); otherwise minibatches, reshuffled each epoch or drawn with ``replacement``,
    ``accumulation`` of them averaged per step. ``eval_every``/``log_every``/``checkpoint_every``
    count steps (``None``: once per epoch / ~200 rows per run / at each evaluation).
    ``patience``: stop after that many evaluations without a lower validation loss.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = 64
    replacement: bool = False
    accumulation: int = 1
    chunk_size: int | None = None
    loss: str = "auto"
    l2: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_factor: float = 0.0
    step_size: int = 1000
    gamma: float = 0.1
    clip_grad_norm: float | None = None
    bf16: bool = False
    eval_every: int | None = None
    log_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    patience: int | None = None
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's ``random`` with ``seed``."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _take(split: Split, batch: Batch) -> tuple[tuple[Tensor, ...], Tensor]:
    return tuple(t[batch] for t in split.inputs), split.targets[batch]


def _size(batch: Batch, n: int) -> int:
    return len(range(*batch.indices(n))) if isinstance(batch, slice) else int(batch.shape[0])


def accumulate_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    split: Split,
    batches: list[Batch],
    *,
    l2: float = 0.0,
    bf16: bool = False,
    count_correct: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Add ``∇L(w)`` to each ``p.grad``, ``L`` the size-weighted mean loss over ``batches`` (+ ``λ/2·||w||²``).

    Returns ``(L, correct)`` detached; ``correct`` counts ``argmax(outputs) == targets`` when asked.
    Each micro-batch is backpropagated as soon as it is computed, so memory holds one at a time.
    """
    n = len(split)
    sizes = [_size(b, n) for b in batches]
    total = sum(sizes)
    device_type = next(model.parameters()).device.type
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64) if count_correct else None
    for batch, size in zip(batches, sizes):
        inputs, targets = _take(split, batch)
        with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            outputs = model(*inputs)
            loss = loss_fn(outputs, targets)
        weighted = loss if size == total else loss * (size / total)
        weighted.backward()
        loss_sum = loss_sum + weighted.detach().double().cpu()
        if correct is not None:
            correct += (outputs.detach().argmax(-1) == targets).sum().cpu()
    if l2:
        penalty = l2_penalty([p for p in model.parameters() if p.requires_grad], l2)
        penalty.backward()
        loss_sum = loss_sum + penalty.detach().double().cpu()
    return loss_sum, correct


def _norm(tensors: list[Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))


class Trainer:
    """Trains ``model`` on ``data.train`` with ``optimizer``, evaluating on ``data.val``.

    >>> trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-3), bundle, TrainConfig(epochs=10))
    >>> summary = trainer.fit()      # {"train": {...}, "val": {...}, "test": {...}, "steps": ..., ...}

    ``scheduler``: any torch LR scheduler (stepped once per optimizer step); by default one is built
    from ``config.schedule`` (see :class:`~descend.train.Schedule`). With ``out_dir`` the run writes
    ``metrics.jsonl``, ``metrics.csv`` and ``checkpoint/``; :meth:`resume` continues it bit for bit.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: DataBundle,
        config: TrainConfig | None = None,
        *,
        loss_fn: LossFn | None = None,
        scheduler: Any = None,
        out_dir: str | Path | None = None,
        is_main: bool = True,
    ) -> None:
        self.config = cfg = config or TrainConfig()
        self.model, self.optimizer, self.data = model, optimizer, data
        self.loss_fn = loss_fn or get_loss(cfg.loss, data.task)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.is_main = is_main
        n = len(data.train)
        self.sampler: Sampler = (
            FullBatch(n, cfg.chunk_size)
            if cfg.batch_size is None
            else Minibatch(n, cfg.batch_size, seed=cfg.seed, replacement=cfg.replacement, accumulation=cfg.accumulation)
        )
        if cfg.steps is not None:
            self.total_steps = int(cfg.steps)
        elif cfg.epochs is not None:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.sampler.steps_per_epoch))
        else:
            raise ValueError("TrainConfig needs steps or epochs")
        if self.total_steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.total_steps}")
        per_epoch = self.sampler.steps_per_epoch
        self.eval_every = cfg.eval_every or (per_epoch if per_epoch > 1 else max(1, self.total_steps // 50))
        self.log_every = cfg.log_every or max(1, self.total_steps // 200)
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        self.schedule = Schedule(
            cfg.schedule, self.total_steps, cfg.warmup_steps, cfg.min_lr_factor, cfg.step_size, cfg.gamma
        )
        if scheduler is None and not self.schedule.is_constant:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        self.scheduler = scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.seconds = 0.0
        self.best_val_loss = math.inf
        self.evals_without_improvement = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._resumed = False
        self._writer: MetricsWriter | None = None
        self._progress: Progress | None = None

    # ---- hooks -----------------------------------------------------------------------------
    def reduce_metrics(self, values: Tensor) -> Tensor:
        """Combine a tensor of per-process sums across processes (DDP: ``all_reduce``); identity here."""
        return values

    def on_log(self, row: dict[str, Any]) -> None:
        """Record one row of metrics (main process only): history, files, progress."""
        self.history.append(row)
        if self._writer is not None:
            self._writer.write(row)
        if self._progress is not None:
            self._progress.update(self.step, row)

    # ---- the loop --------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train until ``config`` says stop (or ``max_steps`` total steps, to pause a run); return the summary."""
        cfg = self.config
        stop_at = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        if self.is_main and self.out_dir is not None:
            self._writer = MetricsWriter(self.out_dir, self.step if self._resumed else None, cfg.tensorboard)
        if self.is_main:
            self._progress = Progress(self.total_steps, self.step, enabled=cfg.progress)
        started = time.perf_counter() - self.seconds
        try:
            while self.step < stop_at and not self.stopped_early:
                measure = (self.step + 1) % self.log_every == 0 or self.step + 1 == self.total_steps
                row = self.train_step(measure)
                self.step += 1
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    row.update(self.validate())
                self.seconds = time.perf_counter() - started
                if row and self.is_main:
                    self.on_log({"step": self.step, "epoch": self.sampler.epoch, "seconds": self.seconds, **row})
                elif self._progress is not None:
                    self._progress.update(self.step)
                if self.out_dir is not None and (self.step % self.checkpoint_every == 0 or self.step == stop_at):
                    self.save_checkpoint()
        finally:
            self.close()
        return self.summary()

    def train_step(self, measure: bool = False) -> dict[str, Any]:
        """One optimizer step; returns the step's metrics when ``measure`` (else ``{}``)."""
        cfg, model, opt = self.config, self.model, self.optimizer
        model.train()
        opt.zero_grad(set_to_none=True)
        lr = opt.param_groups[0]["lr"]
        classify = measure and self.data.task == "classification"
        batches = self.sampler.next_step()
        loss, correct = accumulate_gradient(
            model, self.loss_fn, self.data.train, batches, l2=cfg.l2, bf16=cfg.bf16, count_correct=classify
        )
        loss_value = float(self.reduce_metrics(loss))
        if not math.isfinite(loss_value):
            self._non_finite(loss_value)
        grad_norm = None
        if cfg.clip_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm))
        before = [p.detach().clone() for p in self.params] if measure else None
        opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if not measure:
            return {}
        assert before is not None
        grads = [p.grad for p in self.params if p.grad is not None]
        row: dict[str, Any] = {"lr": float(lr), "loss": loss_value}
        if correct is not None:
            row["accuracy"] = float(correct) / sum(_size(b, len(self.data.train)) for b in batches)
        row["grad_norm"] = grad_norm if grad_norm is not None else _norm(grads)
        row["update_norm"] = _norm([p.detach() - b for p, b in zip(self.params, before)])
        row["weight_norm"] = _norm([p.detach() for p in self.params])
        row.update(self.constraint_metrics())
        return row

    def constraint_metrics(self) -> dict[str, float]:
        """``max|w|`` against the radius ``1/λ`` of decoupled-decay sign methods (from ``optim.constraint_state``)."""
        try:
            constraint_state = importlib.import_module("descend.optim").constraint_state
            groups = constraint_state(self.optimizer)
        except (ImportError, AttributeError, TypeError, ValueError):
            return {}
        constrained = [g for g in groups if g.get("radius") is not None]
        if not constrained:
            return {}
        out: dict[str, float] = {}
        for key in constrained[0]:
            values = [float(g[key]) for g in constrained if isinstance(g.get(key), (int, float))]
            if values:
                out[key] = max(values)  # the tightest spot over param groups
        return out

    @torch.no_grad()
    def evaluate(self, split: Split, chunk_size: int = 4096) -> dict[str, float]:
        """Mean loss (and accuracy, for classification) of the model on ``split``, in chunks."""
        self.model.eval()
        n = len(split)
        loss_sum = torch.zeros(())
        correct = torch.zeros(())
        for start in range(0, n, chunk_size):
            inputs, targets = _take(split, slice(start, min(start + chunk_size, n)))
            with (
                torch.autocast(self.params[0].device.type, dtype=torch.bfloat16)
                if self.config.bf16
                else (contextlib.nullcontext())
            ):
                outputs = self.model(*inputs)
                loss = self.loss_fn(outputs, targets)
            loss_sum += loss.float().cpu() * targets.shape[0]
            if self.data.task == "classification":
                correct += (outputs.argmax(-1) == targets).sum().cpu()
        totals = self.reduce_metrics(torch.stack([loss_sum, correct, torch.tensor(float(n))]))
        result = {"loss": float(totals[0] / totals[2])}
        if self.data.task == "classification":
            result["accuracy"] = float(totals[1] / totals[2])
        return result

    def validate(self) -> dict[str, float]:
        """Evaluate on the validation split and update early stopping; returns ``val_*`` metrics."""
        metrics = self.evaluate(self.data.val)
        if metrics["loss"] < self.best_val_loss:
            self.best_val_loss, self.evals_without_improvement = metrics["loss"], 0
        else:
            self.evals_without_improvement += 1
            if self.config.patience is not None and self.evals_without_improvement >= self.config.patience:
                self.stopped_early = True
        return {f"val_{k}": v for k, v in metrics.items()}

    def summary(self) -> dict[str, Any]:
        """Final loss/accuracy on train, val and test, with the steps, epochs and seconds it took."""
        return {
            "train": self.evaluate(self.data.train),
            "val": self.evaluate(self.data.val),
            "test": self.evaluate(self.data.test),
            "steps": self.step,
            "epochs": self.sampler.epoch,
            "seconds": self.seconds,
            "stopped_early": self.stopped_early,
        }

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _non_finite(self, loss: float) -> None:
        if self.is_main:
            self.on_log({"step": self.step + 1, "epoch": self.sampler.epoch, "loss": loss})
        where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        raise NonFiniteLossError(
            f"the loss became {loss} at step {self.step + 1}{where}; lower the learning rate or set clip_grad_norm"
        )

    # ---- checkpoints -----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seconds": self.seconds,
            "best_val_loss": self.best_val_loss,
            "evals_without_improvement": self.evals_without_improvement,
            "stopped_early": self.stopped_early,
            "optimizer_class": type(self.optimizer).__name__,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler_class": type(self.sampler).__name__,
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """Write the full training state to ``out_dir/checkpoint`` (main process only)."""
        if not self.is_main or self.out_dir is None:
            return None
        self.last_checkpoint = save_checkpoint(
            self.out_dir / "checkpoint",
            self.step,
            self.model.state_dict(),
            self._state(),
            keep=self.config.keep_checkpoints,
        )
        return self.last_checkpoint

    def resume(self, path: str | Path | None = None) -> int:
        """Load the latest checkpoint (``path`` or ``out_dir/checkpoint``); return the step it resumes at.

        Raises :class:`~descend.train.CheckpointError` if it is corrupt or was written for another
        model, optimizer or sampling scheme.
        """
        if path is None:
            if self.out_dir is None:
                raise CheckpointError("resume() needs a checkpoint path or a trainer with out_dir")
            path = self.out_dir / "checkpoint"
        ckpt = load_checkpoint(path)
        mine = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in ckpt.model.items()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
            raise CheckpointError(
                f"checkpoint {ckpt.path} was written for a different model (parameters differ, e.g. {diff}); "
                "resume with the same model options"
            )
        s = ckpt.state
        for what, mine_name in (
            ("optimizer_class", type(self.optimizer).__name__),
            ("sampler_class", type(self.sampler).__name__),
        ):
            if s.get(what) != mine_name:
                raise CheckpointError(
                    f"checkpoint {ckpt.path} was written with {what.split('_')[0]} {s.get(what)}, not {mine_name}"
                )
        self.model.load_state_dict(ckpt.model)
        try:
            self.optimizer.load_state_dict(_restore_tuples(s["optimizer"], self.optimizer.state_dict()))
            if self.scheduler is not None and s["scheduler"] is not None:
                self.scheduler.load_state_dict(s["scheduler"])
            self.sampler.load_state_dict(s["sampler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not match this run: {e}") from e
        set_rng_state(s["rng"])
        self.step, self.seconds = int(s["step"]), float(s["seconds"])
        self.best_val_loss = float(s["best_val_loss"])
        self.evals_without_improvement = int(s["evals_without_improvement"])
        self.stopped_early = bool(s["stopped_early"])
        self.last_checkpoint, self._resumed = ckpt.path, True
        return self.step


def _restore_tuples(saved: Any, current: Any) -> Any:
    """JSON turns tuples (e.g. ``betas``) into lists; give them back the type the live optimizer uses."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return {k: _restore_tuples(v, current.get(k)) for k, v in saved.items()}
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [_restore_tuples(a, b) for a, b in zip(saved, current)]
    if isinstance(saved, list) and isinstance(current, tuple):
        return tuple(saved)
    return saved
