"""Flat storage (``flat=True``): a group's parameters, gradients and state as views of one buffer each.

A step is elementwise, so the update of a hundred tensors is the update of their concatenation. When
the parameters of a param group (per device and dtype) are views of one contiguous buffer, and so are
their gradients and every state tensor, the multi-tensor engines step the whole buffer as a single
tensor: one fused loop instead of one per tensor, and one tensor to check instead of a hundred. This
is the layout DDP's gradient buckets, FSDP's flat parameters and Megatron's gradient buffers use.

:class:`FlatBuffer` builds it: it copies the parameters into one buffer and points each parameter's
``.data`` at its slice (the ``Parameter`` objects, hence the model, stay the same), does the same for
the gradients (``.grad`` becomes a view of a flat gradient buffer, into which ``backward``
accumulates in place) and adopts each state tensor into a flat state buffer after the state is
created. Each parameter starts at a multiple of :data:`ALIGN` elements and the buffers' length is a
multiple of :data:`LANES`; the padding holds zeros, which the elementwise rules map to zeros (its
gradient and state are zero too), and no parameter sees it.

The fused path runs only when it computes what the per-parameter path would: every parameter of the
buffer has its gradient this step (a gradient that autograd allocated anew, after
``module.zero_grad()``, is copied into the buffer and the view re-attached), every parameter's state
exists and they share a step count. A parameter whose ``.grad`` is None skips the step, as in
``torch.optim``; the buffer then steps one parameter at a time that step. Parameters that were moved
or replaced (``module.to(...)``, ``p.data = ...``) leave the layout for good, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

#: Every parameter's slice starts at a multiple of this many elements (64 bytes of float32).
ALIGN = 16
#: The buffers' length is a multiple of this, so the engines can see them as ``[rows, LANES]``
#: (inside ``torch.compile`` that makes each element's index for the rounding noise one vector add;
#: see :func:`descend.optim.engines.store.element_noise`).
LANES = 1024


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def eligible(p: Tensor) -> bool:
    """Whether ``p`` can live in a flat buffer: a dense, contiguous, real, non-empty plain tensor that requires grad."""
    return (type(p) in (torch.nn.Parameter, Tensor) and p.requires_grad and p.layout == torch.strided
            and p.is_contiguous() and not p.is_complex() and p.numel() > 0)


class FlatBuffer:
    """The parameters of one param group with one device and dtype, stored as slices of flat buffers.

    Attributes:
        params: the parameters, in their group's order.
        offsets: where each parameter's slice starts in the buffers.
        data: the flat parameter buffer (``params[i].data`` is a view of it), ``numel`` long.
        grad: the flat gradient buffer (``params[i].grad`` is a view of it while the layout holds).
        states: flat state buffers by state key, once adopted.
        ordinal: the position of the first parameter in the optimizer; it seeds the rounding noise of
            the whole buffer, indexed by the flat position (so the per-parameter path draws the same
            noise, from ``(ordinal, offset + index)``).
    """

    def __init__(self, params: list[Tensor], ordinal: int) -> None:
        self.params = params
        self.offsets: list[int] = []
        numel = 0
        for p in params:
            self.offsets.append(numel)
            numel += _padded(p.numel())
        numel = -(-numel // LANES) * LANES
        self.numel = numel
        p0 = params[0]
        self.data = torch.zeros(numel, device=p0.device, dtype=p0.dtype)
        self.grad = torch.zeros(numel, device=p0.device, dtype=p0.dtype)
        self.grad_views = [self._slice(self.grad, i) for i in range(len(params))]
        with torch.no_grad():
            for i, p in enumerate(params):
                view = self._slice(self.data, i)
                view.copy_(p.detach())
                if p.grad is not None:
                    self.grad_views[i].copy_(p.grad)
                p.data = view
                p.grad = self.grad_views[i]
        self.pointers = [p.data_ptr() for p in params]
        self.states: dict[str, Tensor] = {}
        self.state_views: dict[str, list[Tensor]] = {}
        self.ordinal = ordinal
        # what the last full check found: each parameter's state dict and the keys checked (see ready())
        self.state_dicts: list[dict[str, Any]] = []
        self.checked: list[str] = []

    def rows(self, flat: Tensor) -> Tensor:
        """A flat buffer seen as ``[numel // LANES, LANES]``."""
        return flat.view(-1, LANES)

    def _slice(self, flat: Tensor, i: int) -> Tensor:
        p, start = self.params[i], self.offsets[i]
        return flat[start:start + p.numel()].view(p.shape)

    def intact(self) -> bool:
        """Whether every parameter still lives in the buffer (``module.to()`` or ``p.data = ...`` moves it out)."""
        return all(p.data_ptr() == ptr for p, ptr in zip(self.params, self.pointers))

    def gather_grads(self) -> bool:
        """Make every ``.grad`` its view of the flat gradient buffer; False if a parameter has no gradient.

        A gradient that is not the view (autograd allocated it after ``.grad`` was set to None) is
        copied into the buffer, and the view takes its place.
        """
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return False
        for p, g, view in zip(self.params, grads, self.grad_views):
            if g is not view:
                view.copy_(g)  # type: ignore[arg-type]
                p.grad = view
        return True

    def adopt_states(self, state: dict[Tensor, dict[str, Any]], keys: list[str],
                     state_dtype: torch.dtype | None = None) -> bool:
        """Make each state tensor under ``keys`` a view of its flat buffer; False if one cannot be (one
        that does not fit its parameter: another shape or device, a dtype other than ``state_dtype``, or
        the parameter's if that is None).

        State created by a first step, or loaded by ``load_state_dict``, is copied into the buffer
        once; afterwards the check is one identity test per tensor.
        """
        for key in keys:
            views = self.state_views.get(key)
            current = [state[p].get(key) for p in self.params]
            if views is not None and all(c is v for c, v in zip(current, views)):
                continue
            if any(c is None or not torch.is_tensor(c) or c.shape != p.shape or c.device != p.device
                   or c.dtype != (state_dtype or p.dtype) for c, p in zip(current, self.params)):
                return False
            dtype = current[0].dtype  # type: ignore[union-attr]
            flat = self.states.get(key)
            if flat is None or flat.dtype != dtype:
                flat = torch.zeros(self.numel, device=self.data.device, dtype=dtype)
                self.states[key] = flat
            views = [self._slice(flat, i) for i in range(len(self.params))]
            for p, c, view in zip(self.params, current, views):
                view.copy_(c)  # type: ignore[arg-type]
                state[p][key] = view
            self.state_views[key] = views
        return True

    def ready(self, state: dict[Tensor, dict[str, Any]], keys: list[str],
              state_dtype: torch.dtype | None = None) -> bool:
        """Whether the buffer can step as one tensor: every parameter has its state (``step`` and
        ``keys``) as views of the flat state buffers, with one step count.

        After a full check the next ones are short: the state dicts found then must still be the
        optimizer's (``load_state_dict`` replaces them all, and resets the engine, which calls
        :meth:`invalidate`) and still hold the views.
        """
        dicts = self.state_dicts
        if (dicts and self.checked == keys and state.get(self.params[0]) is dicts[0]
                and all(d.get(k) is v for k in keys for d, v in zip(dicts, self.state_views[k]))):
            return True
        self.invalidate()
        if any(p not in state or "step" not in state[p] for p in self.params):
            return False
        if not self.adopt_states(state, keys, state_dtype) or not self.same_step_counts(state):
            return False
        self.state_dicts = [state[p] for p in self.params]
        self.checked = list(keys)
        return True

    def invalidate(self) -> None:
        """Forget the last full check (the parameters stepped one by one, or the state was replaced)."""
        self.state_dicts, self.checked = [], []

    def same_step_counts(self, state: dict[Tensor, dict[str, Any]]) -> bool:
        """Whether every parameter has taken as many steps as the others."""
        return len({float(state[p]["step"]) for p in self.params}) == 1

    def zero_grad(self, set_to_none: bool) -> None:
        """Zero the gradient buffer and re-attach the views. A parameter that no longer requires grad
        gets None (with ``set_to_none``, or if it had none), so it skips the step as in ``torch.optim``."""
        self.grad.zero_()
        for p, view in zip(self.params, self.grad_views):
            keep = p.requires_grad or (not set_to_none and p.grad is not None)
            p.grad = view if keep else None


class FlatLayout:
    """The flat buffers of an optimizer, per param group; built by ``ChainOptimizer(..., flat=True)``."""

    def __init__(self) -> None:
        self.groups: list[list[FlatBuffer]] = []
        self.members: dict[int, tuple[FlatBuffer, int]] = {}  # id(parameter) -> (its buffer, its offset)
        self.count = 0  # parameters of the groups added so far, flat or not (the next group's first ordinal)
        self.warned = False

    def add_group(self, params: list[Tensor]) -> None:
        """Flatten a new param group's eligible parameters, one buffer per device and dtype."""
        by_kind: dict[tuple[Any, ...], list[tuple[int, Tensor]]] = {}
        for i, p in enumerate(params):
            if eligible(p):
                by_kind.setdefault((p.device, p.dtype), []).append((self.count + i, p))
        self.count += len(params)
        buffers = []
        for members in by_kind.values():
            buffer = FlatBuffer([p for _, p in members], members[0][0])
            buffers.append(buffer)
            for p, offset in zip(buffer.params, buffer.offsets):
                self.members[id(p)] = (buffer, offset)
        self.groups.append(buffers)

    def position(self, p: Tensor) -> tuple[int, int] | None:
        """``(ordinal, offset)`` that seed ``p``'s rounding noise when it lives in a buffer, else None."""
        member = self.members.get(id(p))
        if member is None:
            return None
        buffer, offset = member
        return buffer.ordinal, offset

    def intact_buffers(self, group_index: int) -> list[FlatBuffer]:
        """The group's buffers whose parameters all still live in them; the others leave the layout."""
        buffers = self.groups[group_index] if group_index < len(self.groups) else []
        kept = [b for b in buffers if b.intact()]
        if len(kept) < len(buffers):
            for b in buffers:
                if b not in kept:
                    for p in b.params:
                        self.members.pop(id(p), None)
            self.groups[group_index] = kept
            if not self.warned:
                self.warned = True
                warnings.warn("descend: parameters of a flat=True optimizer were moved or replaced "
                              "(module.to(), p.data = ...); they now step one by one. Create the "
                              "optimizer after moving the model to keep the flat layout.",
                              RuntimeWarning, stacklevel=4)
        return kept

    def zero_grad(self, set_to_none: bool) -> None:
        for buffers in self.groups:
            for buffer in buffers:
                buffer.zero_grad(set_to_none)

    def invalidate(self) -> None:
        """Make every buffer check its state in full on its next step (after ``load_state_dict``)."""
        for buffers in self.groups:
            for buffer in buffers:
                buffer.invalidate()
