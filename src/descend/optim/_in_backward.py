"""The optimizer step inside the backward pass: each parameter stepped as soon as its gradient is ready.

:func:`step_in_backward` registers a hook on every parameter (``Tensor.register_post_accumulate_grad_hook``)
that, once the backward pass has accumulated that parameter's gradient, runs ``optimizer.step()`` and
sets the gradient to ``None``. At that moment every other parameter's gradient is ``None`` (not yet
computed, or already used and freed), so the step moves that parameter alone, and at most one
parameter's gradient is alive at a time (plus autograd's own buffers in flight), instead of all of
them: the gradients' memory falls from one copy of the model to its largest tensor.

For a chain whose rules each act on one parameter at a time (every rule but
:func:`~descend.optim.clip_by_global_norm`) the result is the ordinary ``loss.backward();
optimizer.step()`` to the bit, whatever the engine: each parameter's update depends only on its own
gradient, state and hyperparameters. What needs every gradient at once cannot run this way and is
refused: a chain with a global-norm rule, gradients held in flat buffers (``flat=True``), and data
parallelism (DDP/FSDP average gradients after their hooks). Other limits, by construction: every
``backward()`` is a step (no gradient accumulation over micro-batches; clip per parameter, or not at
all), and a closure cannot be used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["StepInBackward", "step_in_backward"]


class StepInBackward:
    """The hooks of :func:`step_in_backward`; :meth:`remove` (or leaving a ``with`` block) takes them off."""

    def __init__(self, optimizer: torch.optim.Optimizer, l2: float = 0.0) -> None:
        _check(optimizer)
        if not (l2 >= 0 and l2 < float("inf")):
            raise ValueError(f"l2={l2!r}: must be a finite number >= 0")
        self.optimizer, self.l2 = optimizer, float(l2)
        self.params: list[Tensor] = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        present = [p for p in self.params if p.grad is not None]
        if present:
            raise RuntimeError(
                f"{len(present)} parameter(s) already hold a gradient: call optimizer.zero_grad(set_to_none=True) "
                "before step_in_backward, so that each step sees only its own parameter's gradient"
            )
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.params]
        self.checked: int | None = None  # the backward pass (autograd's graph task) that checked for gradients

    def _step(self, param: Tensor) -> None:
        task = _graph_task()
        if task is None or task != self.checked:  # once per backward pass: between its hooks no code sets one
            if any(p.grad is not None for p in self.params if p is not param):
                raise RuntimeError(
                    "another parameter holds a gradient while one is stepped in the backward pass (a gradient "
                    "set by hand?); call optimizer.zero_grad(set_to_none=True) before backward()"
                )
            self.checked = task
        if self.l2:
            with torch.no_grad():
                param.grad.add_(param.detach(), alpha=self.l2)  # type: ignore[union-attr]
        self.optimizer.step()
        param.grad = None

    def remove(self) -> None:
        """Unregister the hooks: ``backward()`` accumulates gradients again and ``step()`` applies them."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _graph_task() -> int | None:
    """The id of the backward pass running this hook (autograd's graph task); None where torch does not say, and
    every hook then checks."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else int(current())


def _check(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"step_in_backward takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    rules = getattr(optimizer, "rules", ())
    if any(getattr(rule, "global_norm", False) for rule in rules):
        raise ValueError(
            "this optimizer's chain clips by the global gradient norm, which needs every gradient at once: it "
            "cannot step inside the backward pass; drop clip_by_global_norm or use the ordinary step"
        )
    if getattr(optimizer, "flat_layout", None) is not None:
        raise ValueError(
            "an optimizer with flat=True keeps all gradients in one buffer: it cannot step inside the backward "
            "pass; construct it with flat=False"
        )
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            "under data parallelism (DDP/FSDP) gradients are averaged across processes after their hooks run: "
            "the step cannot run inside the backward pass; use the ordinary step"
        )


def step_in_backward(optimizer: torch.optim.Optimizer, *, l2: float = 0.0) -> StepInBackward:
    """Step every parameter of ``optimizer`` inside ``backward()``, as soon as its gradient is ready.

    ``l2`` adds ``l2·w`` to each gradient before its step: the gradient of an L2 penalty
    ``l2/2·||w||²`` in the loss, which the backward pass itself never sees.

    >>> opt = optim.AdamW(model.parameters(), lr=1e-3)
    >>> with optim.step_in_backward(opt):
    ...     for x, y in batches:
    ...         loss_fn(model(x), y).backward()     # steps every parameter; no opt.step(), no zero_grad()
    ...         scheduler.step()                     # schedulers, state_dict() and checkpoints work as usual

    See the module docstring for the contract and what is refused. ``optimizer.step()`` outside
    ``backward()`` finds no gradient and does nothing.
    """
    return StepInBackward(optimizer, l2=l2)
