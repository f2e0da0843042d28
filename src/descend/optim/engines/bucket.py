"""What the multi-tensor engines share: a param group's parameters sorted into buckets, each run as one.

A bucket (:class:`Bucket`) holds the parameters of one group with the same device, dtype and step
count whose state already exists; everything else (a parameter's first step, which creates its state
and runs ``Rule.first_update``; zero-size tensors; the parameters of a group where two share memory,
:func:`tensors_overlap`) takes the reference path.
"""

from __future__ import annotations

import array
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain, compress, pairwise, repeat
from operator import attrgetter, is_not, not_
from typing import Any

import torch
from torch import Tensor

from descend.optim._flat import FlatBuffer
from descend.optim.engines.plan import (
    ActiveRules,
    Engine,
    KernelRun,
    Plan,
    Source,
    active_rules,
    check_grad,
    check_state,
    clip_coefficients,
    state_keys,
    state_signed,
    weight_factor,
)
from descend.optim.engines.reference import ReferenceEngine
from descend.optim.engines.shards import DTensor, local
from descend.optim.engines.store import NoisePositions, Store
from descend.optim.engines.tensorlist import TensorList
from descend.optim.rules.base import WeightRule


class Item:
    """One tensor a bucket steps: a parameter (or a piece of one, or a flat buffer), its gradient and state.

    ``states`` lists every active rule's state tensors one after the other, in the order of
    :func:`~descend.optim.engines.plan.state_layout`. ``ordinal`` and ``offset`` say where the rounding
    noise of its elements comes from (:class:`~descend.optim.engines.store.NoisePositions`); they are
    read only where the store, or the parameter's own store (a bfloat16 parameter), rounds stochastically.
    """

    __slots__ = ("grad", "offset", "ordinal", "param", "states", "whole_param")

    def __init__(self, param: Tensor, grad: Tensor, states: list[Tensor], ordinal: int = 0,
                 offset: int = 0, whole_param: bool = True) -> None:
        self.param, self.grad, self.states = param, grad, states
        self.ordinal = ordinal  # the parameter's position in the optimizer
        self.offset = offset  # flat index of this piece's first element in what ``ordinal`` names
        self.whole_param = whole_param  # one whole parameter (a ball projection may act on it alone)

    def piece(self, start: int, stop: int, store: Store) -> Item:
        """Elements ``start:stop`` of this item's flattened (contiguous) tensors, its state cut by ``store``."""
        return Item(self.param.view(-1)[start:stop], self.grad.view(-1)[start:stop],
                    [store.piece(t, start, stop) for t in self.states], self.ordinal, self.offset + start, False)


@dataclass
class Bucket:
    """What one kernel call steps: items of one param group sharing device, dtypes and step count."""

    index: int  # the param group's index
    group: dict[str, Any]
    active: ActiveRules  # the group's active rules with their hyperparameters
    weight_factor: Any  # w <- weight_factor * w + u (1 without decoupled decay)
    items: list[Item]  # the tensors to step
    params: list[Tensor]  # the parameters they belong to (projections act on these)
    step: Tensor  # the bucket's step counter, already advanced (0-d)
    grad_scale: Tensor | None  # a loss scale to divide the gradients by

    def part(self, items: list[Item]) -> Bucket:
        """The same bucket holding only ``items``."""
        return replace(self, items=items)

    def ran(self, kernel: str) -> list[KernelRun]:
        """The report that ``kernel`` stepped this bucket's items."""
        return [KernelRun(self.index, kernel, len(self.items))]


@dataclass
class SortedGroup:
    """A param group whose parameters with a gradient all stepped as one bucket."""

    active: ActiveRules
    keys: list[str]
    items: list[Item]
    params: list[Tensor]
    states: list[dict[str, Any]]
    step: Tensor
    without_grad: list[Tensor]


class StepCounters:
    """The step counters of a bucket kept as the elements of one 1-D tensor, advanced by one operation.

    Each ``state["step"]`` stays its own 0-d tensor (a view of the bucket's packed tensor), so torch's
    state dicts are unchanged, but a bucket's step is one ``add_`` rather than one per parameter.
    Counters packed together were equal when packed and have been advanced together since, so the
    engine knows them equal by identity alone, without reading any, as long as nothing else wrote to
    them (the packed tensor's version counter, which every in-place operation such as
    ``state["step"].zero_()`` advances, is where this engine left it); counters that are not (a first
    bucket step, after ``load_state_dict``, a parameter that skipped a step, a counter changed in place)
    are read and packed anew.
    """

    def __init__(self) -> None:
        # id of a pack's first counter -> the pack's counters and the packed tensor's version after its last add
        self.packs: dict[int, tuple[list[Tensor], int]] = {}

    def reset(self) -> None:
        self.packs.clear()

    def packed(self, steps: list[Tensor]) -> bool:
        known, version = self.packs.get(id(steps[0]), (None, -1))
        return (known is not None and len(known) == len(steps) and all(a is b for a, b in zip(known, steps))
                and tensor_version(steps[0]._base) == version)

    def add(self, steps: list[Tensor]) -> None:
        """Advance a pack by one, remembering the version that leaves it at."""
        base = steps[0]._base
        base.add_(1)
        self.packs[id(steps[0])] = (steps, tensor_version(base))

    def advance(self, states: list[dict[str, Any]]) -> Tensor:
        """``state["step"] += 1`` for each of ``states`` (equal step counts); returns one counter."""
        steps = [s["step"] for s in states]
        if not self.packed(steps):
            if len(self.packs) > 256:  # packs of buckets that no longer exist
                self.packs.clear()
            self.packs.pop(id(steps[0]), None)
            steps = list(torch.stack([s.detach() for s in steps]).unbind(0))
            for s, view in zip(states, steps):
                s["step"] = view
        self.add(steps)
        return steps[0]

    def groups(self, states: list[dict[str, Any]]) -> list[tuple[list[int], Tensor]]:
        """Advance every counter of a bucket; return its parameters' positions grouped by step count,
        each group with one of its (advanced) counters."""
        steps = [s["step"] for s in states]
        if self.packed(steps):
            self.add(steps)
            return [(list(range(len(states))), steps[0])]
        by_count: dict[float, list[int]] = {}
        for i, s in enumerate(steps):
            by_count.setdefault(float(s), []).append(i)
        return [(positions, self.advance([states[i] for i in positions])) for positions in by_count.values()]


#: A tensor's ``.grad``, as a C-level callable for ``map`` over many parameters.
grad_of = attrgetter("grad")


def tensor_version(t: Tensor) -> int:
    """``t``'s version counter (advanced by every in-place operation on it or a view); -1 where torch keeps
    none (an inference tensor), which matches no recorded version."""
    try:
        return t._version
    except RuntimeError:
        return -1


def tensors_overlap(tensors: Sequence[Tensor]) -> bool:
    """Whether two of ``tensors`` may share memory: their address ranges (first to last element) intersect.

    Conservative: interleaved views of one buffer (``x[0::2]``, ``x[1::2]``) count as overlapping.
    """
    spans = []
    for t in map(local, tensors):
        if not t.numel():
            continue
        start = t.data_ptr()
        if t.is_contiguous():
            spans.append((start, start + t.nbytes))
        else:
            extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
            spans.append((start, start + extent * t.element_size()))
    spans.sort()
    return any(start < end for (_, end), (start, _) in pairwise(spans))


def chunks(items: list[Item], limit: int, store: Store) -> Iterator[list[Item]]:
    r"""The bucket in pieces of at most ``limit`` elements (rounded down to whole :attr:`Store.granule`\ s);
    contiguous tensors are cut as flat views."""
    limit = max(store.granule, limit - limit % store.granule)
    piece: list[Item] = []
    size = 0
    for item in items:
        n = item.param.numel()
        if (n > limit and item.param.is_contiguous() and item.grad.is_contiguous()
                and all(store.contiguous(t) for t in item.states)):
            for start in range(0, n, limit):
                stop = min(start + limit, n)
                if size + (stop - start) > limit and piece:
                    yield piece
                    piece, size = [], 0
                piece.append(item.piece(start, stop, store))
                size += stop - start
            continue
        if size + n > limit and piece:
            yield piece
            piece, size = [], 0
        piece.append(item)
        size += n
    if piece:
        yield piece


class BucketEngine(Engine):
    """Shared by the multi-tensor engines: sorts a group's parameters into buckets, then runs each.

    A subclass provides :meth:`run_bucket`; one that runs some buckets on other engines says which in
    :meth:`engine_for` (that engine then also projects the bucket's parameters).
    """

    def __init__(self, plan: Plan, source: Source) -> None:
        super().__init__(plan, source)
        self.reference = ReferenceEngine(plan, source)
        self.counters = StepCounters()
        self.noise_position = NoisePositions(source, plan.layout)
        # state tensors check_state passed (by id, with a weak reference: the same tensor, not a successor
        # at its address); a state tensor is the optimizer's, so one that passed once fits its parameter
        self.fitting: dict[int, weakref.ref[Tensor]] = {}
        self.disjoint: dict[int, array.array] = {}  # by group index: addresses of parameters known not to overlap

    def reset(self) -> None:
        self.counters.reset()
        self.fitting.clear()
        if self.plan.layout is not None:  # the state was replaced: check the flat buffers in full
            self.plan.layout.invalidate()

    def step(self, grad_scale: Tensor | None = None) -> None:
        self.report = []
        groups = self.source.param_groups
        clip = clip_coefficients(self.plan, groups, grad_scale)
        for index, group in enumerate(groups):
            self.step_group(index, group, None if clip is None else clip[index], grad_scale)

    def step_group(self, index: int, group: dict[str, Any], clip_coef: Any,
                   grad_scale: Tensor | None) -> SortedGroup | None:
        """Step one param group; returns what it stepped when every parameter with a gradient went into one
        bucket with one step count (no flat buffer, no clipping factor), else None."""
        plan = self.plan
        active = active_rules(plan, group, clip_coef)
        factor = weight_factor(plan, group)
        keys = state_keys(active)
        signed = state_signed(active)
        one_by_one = group["params"]  # the parameters not stepped as part of a flat buffer
        layout = plan.layout
        if layout is not None:
            buffers = layout.intact_buffers(index)
            in_buffers = {id(p) for b in buffers for p in b.params}
            one_by_one = [p for p in one_by_one if id(p) not in in_buffers]
            for buffer in buffers:
                if not self.step_flat(buffer, index, group, active, factor, keys, grad_scale):
                    buffer.invalidate()  # its parameters step one by one: their counts may part
                    one_by_one += buffer.params
        # C-level loops: a group stepped one parameter at a time (inside the backward pass) is scanned each time
        has_grad = list(map(is_not, map(grad_of, one_by_one), repeat(None)))
        if not all(has_grad):
            stepping = list(compress(one_by_one, has_grad))
            without_grad = list(compress(one_by_one, map(not_, has_grad)))
        else:
            stepping, without_grad = one_by_one, []
        if len(stepping) > 1 and self.overlap(index, stepping):
            # parameters that share memory see each other's updates: step them in the reference engine's
            # order (a bucket steps them together, the native loop even on several threads at once)
            self.step_by_reference(index, stepping, group, active, factor, grad_scale)
            return None
        one_at_a_time = 0  # parameters stepped on the reference path (first steps, zero-size)
        # per (device, dtype, grad dtype): the items, their parameters and their state dicts
        buckets: dict[tuple[Any, ...], tuple[list[Item], list[Tensor], list[dict[str, Any]]]] = {}
        all_state = self.source.state
        # per parameter dtype: its store, the optimizer-state keys of its state tensors, and those with "step"
        stores: dict[torch.dtype, tuple[Store, list[str], set[str]]] = {}
        for p in stepping:
            if p.dtype not in stores:
                store = plan.store_of(p.dtype)
                kept = store.kept_keys(keys)
                stores[p.dtype] = store, kept, {"step", *kept}
            store, kept, needed = stores[p.dtype]
            g = p.grad
            if g.is_sparse or p.is_complex():
                check_grad(p)  # raises
            state = all_state[p]
            if p.numel() == 0 or not needed <= state.keys():
                self.reference.step_param(p, group, active, factor, grad_scale)
                one_at_a_time += 1
                continue
            tensors = [state[k] for k in kept]
            self.check_fits(p, state, keys, tensors)
            states = store.bind(tensors, signed)
            if isinstance(p, DTensor):  # the rules are elementwise: a sharded parameter steps on its shard
                item = Item(local(p), local(g), [store.map(t, local) for t in states])
            else:  # a 0-d parameter as a 1-element view, like the reference engine (step_param)
                item = Item(torch.atleast_1d(p), torch.atleast_1d(g), [store.map(t, torch.atleast_1d) for t in states])
            if store.stochastic or plan.rounds_params(p.dtype):
                item.ordinal, item.offset = self.noise_position(p)
            bucket = buckets.setdefault((p.device, p.dtype, g.dtype), ([], [], []))
            bucket[0].append(item)
            bucket[1].append(p)
            bucket[2].append(state)
        if one_at_a_time:
            self.report.append(KernelRun(index, "reference", one_at_a_time))
        sorted_group = None
        for items, params, states in buckets.values():
            counts = self.counters.groups(states)
            for positions, step in counts:
                every = len(positions) == len(items)  # one step count in the bucket
                self.run(Bucket(index, group, active, factor, items if every else [items[i] for i in positions],
                                params if every else [params[i] for i in positions], step, grad_scale))
            if len(buckets) == 1 and len(counts) == 1 and layout is None and clip_coef is None:
                sorted_group = SortedGroup(active, keys, items, params, states, counts[0][1], without_grad)
        return sorted_group

    def check_fits(self, p: Tensor, state: dict[str, Any], keys: list[str], states: list[Tensor]) -> None:
        """:func:`check_state`, skipped for state tensors that passed it before."""
        fitting = self.fitting
        for t in states:
            known = fitting.get(id(t))
            if known is None or known() is not t:
                check_state(p, state, keys, self.plan.state_dtype)
                fitting.update((id(u), weakref.ref(u)) for u in states)
                return

    def step_by_reference(self, index: int, params: list[Tensor], group: dict[str, Any], active: ActiveRules,
                          factor: Any, grad_scale: Tensor | None) -> None:
        """Step ``params`` one at a time on the reference path."""
        for p in params:
            self.reference.step_param(p, group, active, factor, grad_scale)
        if params:
            self.report.append(KernelRun(index, "reference", len(params)))

    def run(self, bucket: Bucket) -> None:
        """Step a bucket on the engine :meth:`engine_for` picks, which then projects its parameters."""
        engine = self.engine_for(bucket)
        self.report += engine.run_bucket(bucket)
        engine.project(bucket.group, bucket.params)

    def engine_for(self, bucket: Bucket) -> BucketEngine:
        """The engine that steps ``bucket`` (this one)."""
        return self

    def overlap(self, index: int, params: list[Tensor]) -> bool:
        """Whether two of group ``index``'s ``params`` share memory (:func:`tensors_overlap`), read again only
        when their addresses or sizes change."""
        shards = [local(p) for p in params]
        addresses = array.array("q", chain((p.data_ptr() for p in shards), (p.nbytes for p in shards)))
        if self.disjoint.get(index) == addresses:
            return False
        if tensors_overlap(shards):
            return True
        if len(self.disjoint) > 256:
            self.disjoint.clear()
        self.disjoint[index] = addresses
        return False

    def step_flat(self, buffer: FlatBuffer, index: int, group: dict[str, Any], active: ActiveRules, factor: Any,
                  keys: list[str], grad_scale: Tensor | None) -> bool:
        """Step a flat buffer's parameters as one tensor; False (nothing done) where that would differ
        from stepping them one by one (a parameter without gradient or state, unequal step counts)."""
        if not buffer.gather_grads() or not buffer.ready(self.source.state, keys, self.plan.state_dtype):
            return False
        item = Item(buffer.rows(buffer.data), buffer.rows(buffer.grad), [buffer.rows(buffer.states[k]) for k in keys],
                    buffer.ordinal, 0, whole_param=False)
        states = buffer.state_dicts
        if not self.counters.packed([s["step"] for s in states]) and not buffer.same_step_counts(self.source.state):
            return False  # a counter changed in place since the buffer last stepped as one
        step = self.counters.advance(states)
        self.run(Bucket(index, group, active, factor, [item], buffer.params, step, grad_scale))
        return True

    def run_bucket(self, bucket: Bucket) -> list[KernelRun]:
        """Apply the chain to the bucket's items (``w <- weight_factor*w + u``); which kernels stepped them."""
        raise NotImplementedError

    def project(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Apply the chain's projections to updated parameters (box elementwise, ball per whole tensor)."""
        apply_projections(self.plan.projections, group, params)


def apply_projections(projections: Sequence[WeightRule], group: dict[str, Any], params: list[Tensor]) -> None:
    """Apply ``projections`` to updated parameters (box elementwise, ball per whole tensor)."""
    for projection in projections:
        hp = projection.read(group)
        if projection.elementwise:  # one multi-tensor pass over every parameter's local shard
            projection.project_(TensorList([local(p) for p in params]), hp)  # type: ignore[arg-type]
        else:
            for p in params:
                projection.project_(p, hp)
