"""One optimizer step: the gradient over the step's micro-batches, the finite check, clipping, the update.

A step with micro-batches ``B_1 .. B_k`` of sizes ``m_j`` (``M = Σ m_j``) minimises

    L(w) = Σ_j (m_j / M) · mean_{i ∈ B_j} ℓ(f_w(x_i), y_i)  +  λ/2 · ||w||²

At ``W`` processes rank ``r`` holds a share ``B_rj`` (``m_rj`` examples) of every ``B_j`` and
backpropagates ``(W·m_rj/M)·mean_{B_rj} ℓ``; DDP/FSDP2 average over ranks on the last micro-batch
only, so every rank ends with ``Σ_rj (m_rj/M)·∇mean_{B_rj} ℓ``, the one-process gradient. At
``W = 1`` the share is the micro-batch, the weight ``m_j/M`` and the synchronisation a no-op: one
code path. The L2 term's gradient ``λ·w`` is added to each rank's (shard of the) averaged gradient.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from descend import distributed as dd
from descend.data._base import Split
from descend.optim._chain import ChainOptimizer
from descend.train._data import Source, as_source
from descend.train._device import autocast, move
from descend.train._losses import LossFn

__all__ = ["NonFiniteLossError", "accumulate_gradient", "clear_grads", "constraint_metrics", "optimizer_step"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the parameters are those of the last finite step."""


def _accumulator(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def accumulate_gradient(model: nn.Module, loss_fn: LossFn, data: Source | Split, batches: list[Any], *, l2: float = 0.0,
                        bf16: bool = False, count_correct: bool = False, device: torch.device | None = None,
                        in_backward: bool = False) -> tuple[Tensor, Tensor | None]:
    """Add this rank's part of ``∇L(w)`` to each ``p.grad`` (``L`` as in the module docstring).

    ``batches`` are the step's global micro-batches (index tensors or slices of ``data``, or a
    ``DataLoader``'s batches). Each is backpropagated as soon as it is computed, so memory holds
    one at a time. An empty share still runs forward and backward (zero gradient) so every rank
    joins the same collectives.

    ``in_backward``: the optimizer steps inside the backward pass (:func:`descend.optim.step_in_backward`,
    which also adds the L2 term ``λ·w`` to each gradient before its step), so a non-finite loss raises
    :class:`NonFiniteLossError` before it is backpropagated and no gradient is touched here.

    Returns ``(part, correct)``, detached, on the device: ``part`` summed over ranks is ``L``;
    ``correct`` (when ``count_correct``) counts this rank's ``argmax(outputs) == targets``: for sequence
    targets ``[m, T]``, each example counts the fraction of its ``T`` positions that are right.
    """
    source = as_source(data)
    device = device or next(model.parameters()).device
    world, total = dd.world_size(), source.total(batches)
    last = len(batches) - 1
    parts: list[Tensor] = []  # summed once at the end: no per-micro-batch bookkeeping ops
    correct = torch.zeros((), dtype=_accumulator(device), device=device) if count_correct else None
    # the weights move during the backward pass when the step runs inside it: read the penalty before
    penalty = _l2_parts(model, l2, world, device) if l2 and in_backward else []
    for j, batch in enumerate(batches):
        inputs, targets = source.local(batch, world)
        inputs, targets = move(inputs, targets, device)
        m = int(targets.shape[0])
        weight = world * m / total
        if bf16 or j != last:  # autocast, or gradients that must not be synchronised yet
            with dd.sync_gradients(model, enabled=j == last):
                with autocast(device, bf16):
                    outputs, loss = _forward(model, loss_fn, inputs, targets, m)
                if in_backward:
                    _check_finite(float(loss.detach()))
                (loss if weight == 1.0 else loss * weight).backward()
        else:  # the common step: one micro-batch, no context to enter
            outputs, loss = _forward(model, loss_fn, inputs, targets, m)
            if in_backward:
                _check_finite(float(loss.detach()))
            (loss if weight == 1.0 else loss * weight).backward()
        parts.append(loss.detach() if m == total else loss.detach() * (m / total))
        if correct is not None and m:
            hits = outputs.detach().argmax(-1) == targets  # [m] or, for sequences, [m, T]
            correct += hits.sum() if hits.dim() == 1 else hits.double().mean(tuple(range(1, hits.dim()))).sum()
    if l2 and not in_backward:  # the parameters as the model holds them now (FSDP2 swaps them in forward)
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = p.detach() * l2
                else:
                    p.grad.add_(p.detach(), alpha=l2)
        penalty = _l2_parts(model, l2, world, device)
    parts += penalty
    if len(parts) == 1:
        return parts[0], correct
    acc = _accumulator(device)
    return torch.stack([t.to(acc) for t in parts]).sum(), correct


def _l2_parts(model: nn.Module, l2: float, world: int, device: torch.device) -> list[Tensor]:
    """This rank's parts of ``λ/2·||w||²``: summed over ranks, shards count once each, replicas ``W`` times."""
    acc = _accumulator(device)
    parts = []
    for p in model.parameters():
        if p.requires_grad:
            square = dd.local_tensor(p).detach().to(acc).square().sum()
            parts.append(0.5 * l2 * (square if isinstance(p, DTensor) else square / world))
    return parts


def _check_finite(loss: float) -> None:
    if not math.isfinite(loss):
        error = NonFiniteLossError(f"the loss became {loss}")
        error.loss = loss  # type: ignore[attr-defined]
        raise error


def _forward(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The outputs and the mean loss of one micro-batch (of ``m`` examples on this rank)."""
    outputs = model(*inputs)
    return outputs, (loss_fn(outputs, targets) if m else outputs.sum() * 0.0)  # an empty mean is NaN


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``: every gradient becomes None.

    When the optimizer keeps torch's own ``zero_grad`` (descend's do, unless their gradients live
    in flat buffers) the gradients are set to None here directly, without the profiler scope that
    torch opens around every ``zero_grad`` call; any other optimizer's own ``zero_grad`` is called.
    """
    zero_grad = type(optimizer).zero_grad
    if zero_grad is torch.optim.Optimizer.zero_grad or (
        zero_grad is ChainOptimizer.zero_grad and optimizer.flat_layout is None  # type: ignore[attr-defined]
    ):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
    else:
        optimizer.zero_grad(set_to_none=True)


def _subtract_from(before: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """``before - p`` for each pair, written into ``before`` (its copies of the weights): no new memory."""
    by_dtype: dict[tuple[torch.device, torch.dtype, type], list[int]] = {}
    for i, b in enumerate(before):
        by_dtype.setdefault((b.device, b.dtype, type(b)), []).append(i)
    for indices in by_dtype.values():
        torch._foreach_sub_([before[i] for i in indices], [params[i].detach() for i in indices])
    return before


def constraint_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``max|w|`` against the radius ``1/λ`` of decoupled-decay sign methods (from ``optim.constraint_state``)."""
    try:
        optim = importlib.import_module("descend.optim")
        if not any(optim.implied_radius(optimizer, group) is not None for group in optimizer.param_groups):
            return {}  # no bound: nothing to report, and no pass over the weights
        groups = optim.constraint_state(optimizer)
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


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: LossFn, source: Source,
                   batches: list[Any], *, l2: float = 0.0, clip_grad_norm: float | None = None, bf16: bool = False,
                   device: torch.device, measure: bool = False, classify: bool = False,
                   in_backward: bool = False) -> dict[str, Any]:
    """Zero the gradients, accumulate ``∇L``, check ``L`` is finite, clip, step the optimizer and schedule.

    ``in_backward``: the optimizer steps inside the backward pass (:func:`descend.optim.step_in_backward`
    is registered), so the loss is checked before the backward pass, nothing is clipped, the gradients
    are gone afterwards (no ``grad_norm``) and ``optimizer.step()`` is not called again.

    Raises :class:`NonFiniteLossError` (with ``.loss``) before anything moves when ``L`` is NaN or
    infinite. Returns the step's metrics when ``measure`` (``lr`` used, ``loss``, ``accuracy`` for
    ``classify``, ``grad_norm`` before clipping, ``update_norm``, ``weight_norm``), else ``{"loss": L}``.
    """
    if not model.training:  # Module.train() walks every submodule: only after an evaluation
        model.train()
    clear_grads(optimizer)
    lr = optimizer.param_groups[0]["lr"]
    params = [p for g in optimizer.param_groups for p in g["params"]] if measure or clip_grad_norm else []
    before = [p.detach().clone() for p in params] if measure and in_backward else None  # it moves in backward
    loss, correct = accumulate_gradient(
        model, loss_fn, source, batches, l2=l2, bf16=bf16, count_correct=measure and classify, device=device,
        in_backward=in_backward,
    )
    world = dd.world_size()
    counts = [float(loss)]
    if correct is not None:
        counts += [float(correct), sum(source.local_count(b, world) for b in batches)]
    counts = dd.all_reduce_sum(counts) if world > 1 else counts  # one collective per step
    _check_finite(counts[0])
    grad_norm = None
    if clip_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if measure and not in_backward:
        before = [p.detach().clone() for p in params]
    if not in_backward:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if not measure:
        return {"loss": counts[0]}
    assert before is not None
    row: dict[str, Any] = {"lr": float(lr), "loss": counts[0]}
    if correct is not None:
        row["accuracy"] = counts[1] / counts[2]
    if grad_norm is None and not in_backward:
        grad_norm = dd.total_norm(p.grad for p in params if p.grad is not None)
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    row["update_norm"] = dd.total_norm(_subtract_from(before, params))
    row["weight_norm"] = dd.total_norm(p.detach() for p in params)
    if not any(isinstance(p, DTensor) for p in params):  # max|w| of a shard is not the model's
        row.update(constraint_metrics(optimizer))
    return row
