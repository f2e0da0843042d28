"""The training loop: one explicit function, :meth:`Trainer.fit`, with a few named hooks.

One optimizer step, with micro-batches ``B_1 .. B_k`` of sizes ``m_j`` from the sampler
(``M = Σ m_j``; full batch: the chunks of the whole training set), minimises

    L(w) = Σ_j (m_j / M) · mean_{i ∈ B_j} ℓ(f_w(x_i), y_i)  +  λ/2 · ||w||²

(``λ = config.l2``; weight decay, if any, lives in the optimizer), then optionally clips
``||∇L||`` and lets the optimizer move ``w``.

Under ``torchrun`` (``W > 1`` processes, model wrapped by :func:`descend.distributed.wrap`) the
same loop is data parallel: every rank draws the same global micro-batches and keeps its share
(:class:`~descend.distributed.ShardedSampler`); rank ``r`` backpropagates ``(W·m_rj/M)·mean``
over its ``m_rj`` examples of micro-batch ``j`` and DDP/FSDP2 average over ranks on the last
micro-batch only, so the step's gradient is the single-process one (see
:func:`accumulate_sharded_gradient`). Full-batch GD is the case of one step per epoch.

Hooks a subclass overrides:

- :meth:`Trainer.reduce_metrics`: combine per-process sums before they are reported
  (an all-reduce sum over ranks; identity in one process).
- :meth:`Trainer.on_log`: where a row of metrics goes; only called on the main process.
- ``is_main``: rank 0 writes metrics, progress and files; at ``W > 1`` every rank writes its
  shards of a checkpoint (torch.distributed.checkpoint), which resumes at any world size.

Test hook: ``DESCEND_FAIL_AT_STEP=k`` (with ``DESCEND_FAIL_RANK=r``, default 0) makes rank ``r``
raise before step ``k``; the tests use it to kill one rank of a job. Leave both unset.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from descend import distributed as dd
from descend._random import seed_everything
from descend.data._base import DataBundle, Split
from descend.train._checkpoint import (
    CheckpointError,
    commit_checkpoint,
    is_sharded,
    latest_dir,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from descend.train._losses import LossFn, get_loss, l2_penalty
from descend.train._output import MetricsWriter, Progress
from descend.train._sampling import Batch, FullBatch, Minibatch, Sampler
from descend.train._schedule import Schedule

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "accumulate_gradient",
    "accumulate_sharded_gradient",
    "seed_everything",
]


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


def _local(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 DTensor (a plain tensor as it is)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _squares(tensors: list[Tensor]) -> tuple[float, float]:
    """``(Σ||t||² over this rank's shards of DTensors, Σ||t||² over replicated tensors)``, in float64."""
    sharded = replicated = 0.0
    for t in tensors:
        value = float(_local(t).detach().double().square().sum())
        if isinstance(t, DTensor):
            sharded += value
        else:
            replicated += value
    return sharded, replicated


def accumulate_sharded_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    split: Split,
    batches: list[Batch],
    global_total: int,
    *,
    l2: float = 0.0,
    bf16: bool = False,
    count_correct: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """This rank's part of :func:`accumulate_gradient` when ``W`` ranks share every micro-batch.

    ``batches`` are this rank's shares ``B_rj`` (sizes ``m_rj``) of global micro-batches whose sizes
    add up to ``global_total = M``. Rank ``r`` backpropagates ``(W·m_rj/M)·mean_{i∈B_rj} ℓ_i``;
    DDP/FSDP2 average over ranks once, on the last micro-batch (``sync_gradients``), so each rank
    holds ``Σ_rj (m_rj/M)·∇mean_{B_rj} ℓ = ∇ (1/M) Σ_i ℓ_i``, the one-process gradient. The L2
    term's gradient ``λ·w`` is then added to each rank's (shard of the) averaged gradient.

    Returns ``(part, correct)``: their sums over ranks are ``L`` and the number of correct argmaxes.
    An empty share still runs forward and backward (zero gradient) so the collectives match.
    """
    world = dd.world_size()
    n = len(split)
    device_type = next(model.parameters()).device.type
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64) if count_correct else None
    for j, batch in enumerate(batches):
        size = _size(batch, n)
        inputs, targets = _take(split, batch)
        with dd.sync_gradients(model, enabled=j == len(batches) - 1):
            with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                outputs = model(*inputs)
                loss = loss_fn(outputs, targets) if size else outputs.sum() * 0.0  # an empty mean is NaN
            (loss * (world * size / global_total)).backward()
        loss_sum = loss_sum + loss.detach().double().cpu() * (size / global_total)
        if correct is not None and size:
            correct += (outputs.detach().argmax(-1) == targets).sum().cpu()
    if l2:
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = p.detach() * l2
                else:
                    p.grad.add_(p.detach(), alpha=l2)
        sharded, replicated = _squares(params)
        loss_sum = loss_sum + 0.5 * l2 * (sharded + replicated / world)  # summed over ranks: λ/2·||w||²
    return loss_sum, correct


def _norm(tensors: list[Tensor]) -> float:
    if not tensors:
        return 0.0
    if dd.world_size() > 1:  # the global norm: FSDP2 shards are summed over ranks, replicas are not
        sharded, replicated = _squares(tensors)
        return math.sqrt(dd.all_reduce_sum([sharded])[0] + replicated)
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))


def _fail_hook() -> tuple[int, int] | None:
    """``(step, rank)`` from ``DESCEND_FAIL_AT_STEP``/``DESCEND_FAIL_RANK`` (a test hook), else None."""
    step = os.environ.get("DESCEND_FAIL_AT_STEP")
    if not step:
        return None
    return int(step), int(os.environ.get("DESCEND_FAIL_RANK", "0"))


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
        self.world = dd.world_size()
        if self.world > 1:
            dd.check_wrapped(model)
        n = len(data.train)
        self.base_sampler: Sampler = (
            FullBatch(n, cfg.chunk_size)
            if cfg.batch_size is None
            else Minibatch(n, cfg.batch_size, seed=cfg.seed, replacement=cfg.replacement, accumulation=cfg.accumulation)
        )
        # At W > 1 every rank draws the same global micro-batches and keeps its share of each.
        self.sampler: Any = dd.ShardedSampler(self.base_sampler) if self.world > 1 else self.base_sampler
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
        self._fail_at = _fail_hook()

    # ---- hooks -----------------------------------------------------------------------------
    def reduce_metrics(self, values: Tensor) -> Tensor:
        """Sum a tensor of per-process sums over the ranks (identity in one process)."""
        if self.world == 1:
            return values
        summed = dd.all_reduce_sum(values.reshape(-1).tolist())
        return torch.tensor(summed, dtype=values.dtype).reshape(values.shape)

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
                if self._fail_at is not None and self._fail_at == (self.step + 1, dd.rank()):
                    raise RuntimeError(f"injected failure at step {self.step + 1} (DESCEND_FAIL_AT_STEP test hook)")
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
        if self.world > 1:
            examples = sum(self.sampler.global_sizes)
            loss, correct = accumulate_sharded_gradient(
                model,
                self.loss_fn,
                self.data.train,
                batches,
                examples,
                l2=cfg.l2,
                bf16=cfg.bf16,
                count_correct=classify,
            )
            if correct is not None:
                correct = self.reduce_metrics(correct)
        else:
            examples = sum(_size(b, len(self.data.train)) for b in batches)
            loss, correct = accumulate_gradient(
                model, self.loss_fn, self.data.train, batches, l2=cfg.l2, bf16=cfg.bf16, count_correct=classify
            )
        loss_value = float(self.reduce_metrics(loss))
        if not math.isfinite(loss_value):
            self._non_finite(loss_value)
        grad_norm = None
        if cfg.clip_grad_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
            grad_norm = float(total.full_tensor() if isinstance(total, DTensor) else total)
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
            row["accuracy"] = float(correct) / examples
        row["grad_norm"] = grad_norm if grad_norm is not None else _norm(grads)
        row["update_norm"] = _norm([p.detach() - b for p, b in zip(self.params, before)])
        row["weight_norm"] = _norm([p.detach() for p in self.params])
        if not any(isinstance(p, DTensor) for p in self.params):  # max|w| of a shard is not the model's
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
        if self.world > 1:
            return self._evaluate_sharded(split, chunk_size)
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

    def _evaluate_sharded(self, split: Split, chunk_size: int) -> dict[str, float]:
        """:meth:`evaluate` at ``W > 1``: each rank its share, in the same number of chunks on every rank
        (FSDP2 gathers parameters in each forward, so every rank must run as many)."""
        model = dd.unwrap(self.model)  # DDP: the local replica (no collectives); FSDP2: the sharded model
        model.eval()
        n = len(split)
        mine = dd.shard(slice(0, n))
        chunks = max(1, math.ceil(math.ceil(n / self.world) / chunk_size))
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, examples
        for k in range(chunks):
            piece = dd.shard(mine, k, chunks)
            size = _size(piece, n)
            if size == 0 and not isinstance(model, FSDPModule):
                continue
            inputs, targets = _take(split, piece)
            with (
                torch.autocast(self.params[0].device.type, dtype=torch.bfloat16)
                if self.config.bf16
                else contextlib.nullcontext()
            ):
                outputs = model(*inputs)
                if size == 0:
                    continue
                loss = self.loss_fn(outputs, targets)
            sums[0] += float(loss) * size
            sums[2] += size
            if self.data.task == "classification":
                sums[1] += float((outputs.argmax(-1) == targets).sum())
        totals = self.reduce_metrics(sums)
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
            "sampler_class": type(self.base_sampler).__name__,
            "sampler": self.base_sampler.state_dict(),
            "rng": rng_state(),
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """Write the full training state to ``out_dir/checkpoint``.

        One process: the main process writes safetensors + JSON. ``W > 1``: every rank calls this
        and writes its shards with torch.distributed.checkpoint; rank 0 then points ``latest.json``
        at the directory, once every rank has finished.
        """
        if self.out_dir is None:
            return None
        if self.world > 1:
            return self._save_sharded()
        if not self.is_main:
            return None
        self.last_checkpoint = save_checkpoint(
            self.out_dir / "checkpoint",
            self.step,
            self.model.state_dict(),
            self._state(),
            keep=self.config.keep_checkpoints,
        )
        return self.last_checkpoint

    def _save_sharded(self) -> Path:
        assert self.out_dir is not None
        root = self.out_dir / "checkpoint"
        name = f"step-{self.step:08d}"
        path = root / name
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # left by a run that died while writing it
                shutil.rmtree(path)
        dd.barrier()
        state = self._state()
        del state["optimizer"]  # DCP writes the (sharded) optimizer state itself
        dd.save_checkpoint(path, self.model, self.optimizer, extra=state)  # ends with a barrier
        if self.is_main:
            commit_checkpoint(root, self.step, name, keep=self.config.keep_checkpoints, kind="dcp")
        self.last_checkpoint = path
        return path

    def resume(self, path: str | Path | None = None) -> int:
        """Load the latest checkpoint (``path`` or ``out_dir/checkpoint``); return the step it resumes at.

        Raises :class:`~descend.train.CheckpointError` if it is corrupt or was written for another
        model, optimizer or sampling scheme.
        """
        if path is None:
            if self.out_dir is None:
                raise CheckpointError("resume() needs a checkpoint path or a trainer with out_dir")
            path = self.out_dir / "checkpoint"
        if is_sharded(latest_dir(path)):
            return self._resume_sharded(latest_dir(path))
        ckpt = load_checkpoint(path)
        mine = {k: tuple(v.shape) for k, v in dd.unwrap(self.model).state_dict().items()}
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
            ("sampler_class", type(self.base_sampler).__name__),
        ):
            if s.get(what) != mine_name:
                raise CheckpointError(
                    f"checkpoint {ckpt.path} was written with {what.split('_')[0]} {s.get(what)}, not {mine_name}"
                )
        try:
            optimizer_state = _restore_tuples(s["optimizer"], self.optimizer.state_dict())
            if any(isinstance(p, DTensor) for p in self.params):
                self._load_full_into_shards(ckpt.model, optimizer_state)
            else:  # one process or DDP replicas: each rank loads the whole state
                dd.unwrap(self.model).load_state_dict(ckpt.model)
                self.optimizer.load_state_dict(optimizer_state)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not match this run: {e}") from e
        self._restore(s, ckpt.path)
        return self.step

    def _load_full_into_shards(self, model_state: dict[str, Tensor], optimizer_state: dict[str, Any]) -> None:
        """Load a one-process checkpoint into FSDP2 shards: re-key the optimizer state from parameter
        positions to parameter names, then let each rank keep its shard of every full tensor."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        name_of = {id(p): n for n, p in dd.unwrap(self.model).named_parameters()}
        names = [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        by_name = {
            "state": {names[int(i)]: v for i, v in optimizer_state["state"].items()},
            "param_groups": [
                {**g, "params": [names[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]
            ],
        }
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=model_state,
            optim_state_dict=by_name,
            options=StateDictOptions(full_state_dict=True),
        )

    def _resume_sharded(self, path: Path) -> int:
        """Resume from a torch.distributed.checkpoint directory, at this run's world size (any)."""
        try:
            s = dd.load_checkpoint(path, self.model, self.optimizer)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {path} does not match this run (resume with the same model and optimizer options): {e}"
            ) from e
        for what, mine_name in (
            ("optimizer_class", type(self.optimizer).__name__),
            ("sampler_class", type(self.base_sampler).__name__),
        ):
            if s.get(what) != mine_name:
                raise CheckpointError(
                    f"checkpoint {path} was written with {what.split('_')[0]} {s.get(what)}, not {mine_name}"
                )
        self._restore(s, path)
        return self.step

    def _restore(self, s: dict[str, Any], path: Path) -> None:
        """Scheduler, sampler, RNG and loop counters from a checkpoint's state ``s``."""
        try:
            if self.scheduler is not None and s["scheduler"] is not None:
                self.scheduler.load_state_dict(s["scheduler"])
            self.base_sampler.load_state_dict(s["sampler"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} does not match this run: {e}") from e
        set_rng_state(s["rng"])
        self.step, self.seconds = int(s["step"]), float(s["seconds"])
        self.best_val_loss = float(s["best_val_loss"])
        self.evals_without_improvement = int(s["evals_without_improvement"])
        self.stopped_early = bool(s["stopped_early"])
        self.last_checkpoint, self._resumed = path, True


def _restore_tuples(saved: Any, current: Any) -> Any:
    """JSON turns tuples (e.g. ``betas``) into lists; give them back the type the live optimizer uses."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return {k: _restore_tuples(v, current.get(k)) for k, v in saved.items()}
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [_restore_tuples(a, b) for a, b in zip(saved, current)]
    if isinstance(saved, list) and isinstance(current, tuple):
        return tuple(saved)
    return saved
