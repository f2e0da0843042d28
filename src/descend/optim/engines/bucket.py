"""How a chain's step executes. Every engine computes what :class:`ReferenceEngine` computes.

- :class:`ReferenceEngine` (``engine="reference"``): one parameter at a time, Python numbers for
  hyperparameters. The oracle the other engines are tested against.
- :class:`ForeachEngine` (``engine="foreach"``): the parameters of a bucket (param group, device,
  dtype, step count) go through the chain together as a :class:`~descend.optim.engines.tensorlist.TensorList`,
  so each tensor operation of a rule is one multi-tensor operation per chunk of at most
  :data:`CHUNK` elements; temporaries of large tensors go to reused scratch buffers.
- :class:`CompiledEngine` (``engine="compiled"``): the whole chain of a bucket (gradient unscaling,
  ``maximize``, stochastic rounding and projections included) traced by ``torch.compile`` into one
  fused pass. Hyperparameters and the per-step scalars of :meth:`Rule.scalars
  <descend.optim._rules.Rule.scalars>` enter as 0-d float64 tensors, so a scheduler triggers no
  recompile; scalar expressions are evaluated in double precision and converted to the parameter's
  dtype before they meet the elements. If compiling fails it runs the foreach engine instead.
- :class:`NativeEngine` (``engine="native"``): the chain of a bucket of float32 CPU tensors (state in
  float32 or bfloat16) as one C loop that :mod:`descend.optim.engines.native.compiler` generates from the rules
  themselves, compiled once per machine; other buckets, and every bucket where no C compiler works,
  run on the foreach engine.
- :class:`FusedEngine` (``engine="fused"``): torch's own fused kernels (``torch._fused_adam_``,
  ``torch._fused_adamw_``, ``torch._fused_sgd_``) for buckets whose live chain is exactly one of
  them (:func:`torch_kernel`); the same equations as the rules, evaluated in another order.
- :class:`AutoEngine` (``engine="auto"``, the default): per bucket, on the CPU the native loop for
  every chain it can run and the foreach engine for the rest (no torch kernel: each computes what the
  reference engine computes); elsewhere torch's Adam, AdamW or SGD kernel where :func:`torch_kernel`
  finds one, the compiled engine for a flat buffer (``flat=True``) of at least :data:`COMPILE_MIN`
  elements, the foreach engine otherwise. A compile failure falls back and is logged, never raised.
  Why: ``docs/guide/engines.md``.

With ``flat=True`` (:mod:`descend.optim._flat`) a group's parameters, gradients and state are views
of one buffer each, and the multi-tensor engines step such a buffer as a single tensor
(:meth:`BucketEngine.step_flat`) whenever that computes what stepping its parameters one by one would.

Shared by all engines: a parameter's state is checked against the parameter before it is touched
(:func:`check_state`); a parameter's first step (state creation, ``Rule.first_update``), zero-size
parameters and the parameters of a group where two share memory (:func:`tensors_overlap`) go through
the reference path; the multi-tensor engines keep the step
counters of a bucket as the elements of one tensor and advance them with one operation
(:class:`StepCounters`); ``clip_by_global_norm`` computes the global norm over every gradient
first; ``grad_scale`` (from ``torch.amp.GradScaler``) divides the gradient inside the step; state
kept in ``state_dtype=torch.bfloat16`` is updated in float32 and written back with stochastic
rounding (:mod:`descend.optim.engines.store`).
"""

from __future__ import annotations

import array
import logging
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, pairwise, repeat
from operator import attrgetter, is_, itemgetter
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim.optimizer import _get_fused_kernels_supported_devices as _fused_kernels_supported_devices

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]

from descend.optim._flat import LANES, FlatBuffer, FlatLayout
from descend.optim._rules import (
    L2,
    DecoupledDecay,
    HeavyBall,
    Rule,
    ScaleByAdam,
    ScaleByLR,
    WeightRule,
    step_dtype,
)
from descend.optim.engines.native import compiler as native
from descend.optim.engines.store import (
    LOW_PRECISION,
    element_noise,
    rounding_seeds,
    stochastic_round,
    stochastic_round_into_,
    write_back_,
)
from descend.optim.engines.tensorlist import Scratch, TensorList

Live = list[tuple[Rule, dict[str, Any]]]


@dataclass(frozen=True)
class Plan:
    """What an engine runs, built by the optimizer from its chain.

    Attributes:
        rules: the update rules in order (``scale_by_lr`` included).
        decays: weight rules folded into ``w <- keep * w + u`` (:attr:`WeightRule.scales_weights`).
        projections: weight rules applied to ``w`` after the step (:attr:`WeightRule.projects`).
        state_dtype: dtype of the optimizer state (None: the parameter's).
        layout: the flat buffers (``flat=True``), or None.
    """

    rules: tuple[Rule, ...]
    decays: tuple[WeightRule, ...] = ()
    projections: tuple[WeightRule, ...] = ()
    state_dtype: torch.dtype | None = None
    layout: FlatLayout | None = None

    def describe(self) -> str:
        return " -> ".join(rule.name for rule in (*self.rules, *self.decays, *self.projections))


class Source(Protocol):
    """Where an engine finds what it steps: torch's ``param_groups`` and per-parameter ``state`` (an optimizer)."""

    param_groups: list[dict[str, Any]]
    state: Any

#: Largest number of elements the foreach engine hands to one multi-tensor operation (1 MiB of float32):
#: large enough that per-operation overhead stays small, small enough that a chunk's working set
#: stays in cache and its scratch buffers are few MiB.
CHUNK = 1 << 18

#: Device types torch has fused Adam, AdamW and SGD kernels for.
FUSED_DEVICES = frozenset(_fused_kernels_supported_devices())

#: State dtypes the native loop runs (None: the parameter's, float32).
NATIVE_STATE = (None, torch.float32, torch.bfloat16)

#: Fewest elements of a flat buffer for which ``engine="auto"`` compiles its step.
COMPILE_MIN = 1 << 20

logger = logging.getLogger("descend.optim")


def check_grad(p: Tensor) -> Tensor:
    """The parameter's gradient, or a clear error for the kinds descend does not handle."""
    g = p.grad
    assert g is not None
    if g.is_sparse:
        raise RuntimeError("descend optimizers do not support sparse gradients; use dense gradients "
                           "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam")
    if torch.is_complex(p):
        raise RuntimeError("descend optimizers do not support complex parameters; store them as real "
                           "tensors (torch.view_as_real) and rebuild with torch.view_as_complex")
    return g


def check_state(p: Tensor, state: dict[str, Any], keys: Iterable[str], state_dtype: torch.dtype | None) -> None:
    """Raise ``RuntimeError`` unless each of ``state[key]`` (those present) fits ``p``: a tensor of ``p``'s
    shape on ``p``'s device, of the optimizer's state dtype (``state_dtype``, else ``p``'s).

    Every engine checks this before it touches a state tensor: the native loop walks ``p.numel()``
    elements of each, so a state of another size would be read and written out of bounds.
    """
    dtype = state_dtype or p.dtype
    for key in keys:
        t = state.get(key)
        if t is None:
            continue
        if not torch.is_tensor(t) or t.shape != p.shape or t.device != p.device or t.dtype != dtype:
            found = (f"shape {tuple(t.shape)}, {t.dtype} on {t.device}" if torch.is_tensor(t)
                     else f"a {type(t).__name__}")
            raise RuntimeError(
                f"optimizer state {key!r} ({found}) does not fit its parameter (shape {tuple(p.shape)}, {dtype} "
                f"on {p.device}): the state belongs to other parameters (a checkpoint of a resized model?); "
                "load a state_dict saved for these parameters, or drop this parameter's state "
                "(optimizer.state.pop(param))")


def tensors_overlap(tensors: Iterable[Tensor]) -> bool:
    """Whether two of ``tensors`` may share memory: their address ranges (first to last element) intersect.

    Conservative: interleaved views of one buffer (``x[0::2]``, ``x[1::2]``) count as overlapping.
    """
    spans = []
    for t in tensors:
        t = _local(t)
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


def clip_coefficients(plan: Plan, groups: list[dict[str, Any]], grad_scale: Tensor | None = None) -> list[Any] | None:
    """Per group, ``min(1, max_norm / (||g||_2 + 1e-6))`` with the norm over all (unscaled) gradients, or None."""
    if not plan.rules or not plan.rules[0].global_norm:
        return None
    grads = [p.grad for group in groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    total = torch.nn.utils.get_total_norm(grads, foreach=False)
    if isinstance(total, DTensor):  # sharded gradients: the norm is already reduced over the shards
        total = total.full_tensor()
    if grad_scale is not None:
        total = total / grad_scale.to(total.device, total.dtype)
    key = plan.rules[0].keys["max_grad_norm"]
    return [torch.clamp(group[key] / (total + 1e-6), max=1.0) for group in groups]


def weight_keep(plan: Plan, group: dict[str, Any]) -> Any:
    """The factor decoupled decay multiplies the weights by this step (1 without decay)."""
    keep: Any = 1
    for rule in plan.decays:
        hp = rule.read(group)
        if rule.active(hp):
            keep = keep * rule.keep(hp, group["lr"])
    return keep


def rule_state(rule: Rule, state: dict[str, Any], w: Tensor, hp: dict[str, Any],
               dtype: torch.dtype | None) -> tuple[dict[str, Tensor], bool]:
    """The rule's view of a parameter's state (by the rule's own names), created if missing."""
    names = rule.state_keys(hp)
    fresh = any(rule.state_names.get(n, n) not in state for n in names)
    if fresh:
        for name, value in rule.init_state(w, hp, dtype).items():
            state[rule.state_names.get(name, name)] = value
    return {n: state[rule.state_names.get(n, n)] for n in names}, fresh


def state_slot(rule_index: int, key_index: int) -> int:
    """The slot number of a rule's state tensor in the chain (it seeds the tensor's rounding noise)."""
    return 16 * rule_index + key_index


def state_layout(live: Live) -> tuple[tuple[str, ...], ...]:
    """Per live rule, the rule's names of its state tensors: the order of :attr:`_Item.states`."""
    return tuple(tuple(rule.state_keys(hp)) for rule, hp in live)


def state_keys(live: Live) -> list[str]:
    """The optimizer state's keys of the live rules' state tensors, in the order of :func:`state_layout`."""
    return [rule.state_names.get(n, n) for (rule, _), names in zip(live, state_layout(live)) for n in names]


def state_columns(items: list[_Item], layout: tuple[tuple[str, ...], ...]) -> list[list[list[Tensor]]]:
    """``columns[r][j]``: rule ``r``'s ``j``-th state tensor (named ``layout[r][j]``) of every item."""
    columns, first = [], 0  # first: index in item.states of the rule's first state tensor
    for names in layout:
        columns.append([[item.states[first + j] for item in items] for j in range(len(names))])
        first += len(names)
    return columns


def bucket_seeds(items: list[_Item], step: Tensor, layout: tuple[tuple[str, ...], ...]) -> list[list[Tensor]]:
    """``seeds[r][j]``: int32 rounding seeds (one per item) of rule ``r``'s ``j``-th state tensor this step."""
    ordinals = torch.tensor([item.ordinal for item in items], dtype=torch.int32)
    device = items[0].param.device
    step = step.cpu()
    return [[rounding_seeds(step, ordinals, state_slot(r, j)).to(device) for j in range(len(names))]
            for r, names in enumerate(layout)]


def with_scalars(live: Live, step: int | Tensor) -> Live:
    """The live rules with their per-step scalars (:meth:`Rule.scalars`) merged into their hyperparameters."""
    out: Live = []
    for rule, hp in live:
        extra = rule.scalars(hp, step)
        out.append((rule, {**hp, **extra} if extra else hp))
    return out


def traced_scalars(live: Live, step: Tensor) -> Live:
    """:func:`with_scalars` in a step that ``torch.compile`` traces, ``step`` a 0-d tensor.

    The per-step scalars are stacked into one tensor: inductor computes a stacked value once per step,
    where it would inline a 0-d expression (Adam's powers of the betas) into every vector iteration of
    each loop that reads it.
    """
    out = with_scalars(live, step)
    computed = [(i, key) for i, ((_, hp), (_, given)) in enumerate(zip(out, live)) for key in hp if key not in given]
    if computed:
        stacked = torch.stack([out[i][1][key] for i, key in computed])
        for j, (i, key) in enumerate(computed):
            out[i][1][key] = stacked[j]
    return out


def step_scalars(live: Live, keep: Any, step: int) -> tuple[list[float], tuple[Any, ...], bool]:
    """The native loop's scalars at step number ``step``: the live rules' hyperparameters and per-step
    scalars in trace order, then ``keep`` if the weights decay; the hyperparameters' shapes (which
    select the kernel); whether the weights decay. Raises ``NotTraceable`` for a value that is no number."""
    flat = [native.flatten_hyper(hp, rule.static) for rule, hp in with_scalars(live, step)]
    decays = not (isinstance(keep, (int, float)) and keep == 1)
    scalars = [x for numbers, _ in flat for x in numbers] + ([float(keep)] if decays else [])
    return scalars, tuple(shape for _, shape in flat), decays


def rounds_stochastically(plan: Plan) -> bool:
    """Whether state is kept in a low-precision dtype, updated in float32 and rounded stochastically."""
    return plan.state_dtype in LOW_PRECISION


def live_rules(plan: Plan, group: dict[str, Any], clip_coef: Any) -> Live:
    """The group's active rules with their hyperparameters (``clip_coef`` added for the clipping rule)."""
    hps = [rule.read(group) for rule in plan.rules]
    if clip_coef is not None:
        hps[0]["clip_coef"] = clip_coef
    return [(rule, hp) for rule, hp in zip(plan.rules, hps) if rule.active(hp)]


def traced_plans(plan: Plan, groups: list[dict[str, Any]],
                 grad_scale: Tensor | None) -> list[tuple[dict[str, Any], Live, Any]]:
    """:func:`group_plans` for a step that ``torch.compile`` traces, with every number a 0-d float64 tensor.

    The live rules' hyperparameters (static flags aside) and the decay factor ``keep`` (left at 1 without
    decay) become tensors computed in the graph (:func:`_as_tensors` with ``traced=True``), so the
    Python numbers they come from stay inputs of the graph: a scheduler changing them between steps
    triggers one recompile (dynamo's automatic dynamic floats) the first time, none after.
    """
    out = []
    for group, live, keep in group_plans(plan, groups, grad_scale):
        live = [(rule, _as_tensors(hp, rule.static, traced=True)) for rule, hp in live]
        decays = not (isinstance(keep, (int, float)) and keep == 1)
        out.append((group, live, _as_tensors({"keep": keep}, (), traced=True)["keep"] if decays else keep))
    return out


def group_plans(plan: Plan, groups: list[dict[str, Any]],
                grad_scale: Tensor | None) -> Iterator[tuple[dict[str, Any], Live, Any]]:
    """Per param group: the group, its live rules (with the clipping factor) and its decay factor ``keep``.

    The global gradient norm for clipping is computed once, before the first group.
    """
    clip = clip_coefficients(plan, groups, grad_scale)
    for gi, group in enumerate(groups):
        yield group, live_rules(plan, group, None if clip is None else clip[gi]), weight_keep(plan, group)


class Engine:
    """Runs an optimizer's chain over its parameters."""

    name = "engine"

    def __init__(self, plan: Plan, source: Source) -> None:
        self.plan = plan
        self.source = source
        self.ordinals: dict[Tensor, int] = {}

    def position(self, p: Tensor) -> tuple[int, int]:
        """``(ordinal, offset)``: what seeds ``p``'s rounding noise, and the flat index of its first element.

        The ordinal is ``p``'s position among the optimizer's parameters (over all groups). A
        parameter in a flat buffer (``flat=True``) takes the buffer's ordinal and its offset in the
        buffer, so stepping it alone draws the noise that stepping the whole buffer draws.
        """
        layout = self.plan.layout
        if layout is not None:
            found = layout.position(p)
            if found is not None:
                return found
        if p not in self.ordinals:
            self.ordinals = {q: i for i, q in enumerate(q for g in self.source.param_groups for q in g["params"])}
        return self.ordinals[p], 0

    def step(self, grad_scale: Tensor | None = None) -> None:
        """One step over every parameter with a gradient; gradients are divided by ``grad_scale`` if given."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget anything derived from the optimizer's state (called after ``load_state_dict``)."""


class ReferenceEngine(Engine):
    """The readable loop: per parameter ``u <- g``, each active rule in turn, ``w <- keep*w + u``."""

    name = "reference"

    def step(self, grad_scale: Tensor | None = None) -> None:
        self.step_groups(group_plans(self.plan, self.source.param_groups, grad_scale), grad_scale)

    def step_groups(self, plans: Iterable[tuple[dict[str, Any], Live, Any]], grad_scale: Tensor | None = None) -> None:
        """Step every parameter with a gradient, per group as ``plans`` (:func:`group_plans`) give it."""
        for group, live, keep in plans:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group, live, keep, grad_scale)

    def step_param(self, p: Tensor, group: dict[str, Any], live: Live, keep: Any = 1,
                   grad_scale: Tensor | None = None) -> None:
        """One step of one parameter (also the first step of every parameter under the other engines)."""
        plan = self.plan
        g = check_grad(p)
        u = g / grad_scale.to(g.device) if grad_scale is not None else g
        u = -u if group["maximize"] else u
        state = self.source.state[p]
        check_state(p, state, state_keys(live), plan.state_dtype)
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=step_dtype())
        state["step"] += 1
        # traced by torch.compile the count stays a tensor (float64: as exact as the number), which the graph
        # reads instead of specialising on each value
        step = state["step"].double() if torch.compiler.is_compiling() else int(state["step"].item())
        widen = rounds_stochastically(plan)
        ordinal, offset = self.position(p) if widen else (0, 0)
        ordinals = torch.tensor([ordinal], dtype=torch.int32) if widen else None
        scaled = with_scalars(live, step) if isinstance(step, int) else traced_scalars(live, step)
        for r, (rule, hp) in enumerate(scaled):
            view, fresh = rule_state(rule, state, p, hp, plan.state_dtype)
            work = {k: v.float() for k, v in view.items()} if widen else view
            u = (rule.first_update if fresh else rule.update)(u, p, work, hp, step)
            if widen:
                assert ordinals is not None
                for j, (k, v) in enumerate(view.items()):
                    seed = rounding_seeds(state["step"], ordinals, state_slot(r, j))[0].to(v.device)
                    write_back_(v, work[k], seed, offset)
        if torch.is_tensor(keep) or keep != 1:  # decoupled decay acts on w: w <- keep*w + u
            p.mul_(keep)
        p.add_(u)
        for projection in plan.projections:
            projection.project_(p, projection.read(group))


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


def tensor_version(t: Tensor) -> int:
    """``t``'s version counter (advanced by every in-place operation on it or a view); -1 where torch keeps
    none (an inference tensor), which matches no recorded version."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: updating it updates the DTensor); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _flat_ok(tensors: list[Tensor]) -> bool:
    return all(t.is_contiguous() for t in tensors)


class _Item:
    """One parameter of a bucket: the parameter, its gradient and the live rules' state tensors.

    ``states`` lists every live rule's state tensors one after the other, in the order of
    :func:`state_layout` (a flat list: building a dict per rule per parameter every step was the
    largest single cost of the bookkeeping).
    """

    __slots__ = ("grad", "offset", "ordinal", "param", "states", "whole")

    def __init__(self, param: Tensor, grad: Tensor, states: list[Tensor], ordinal: int = 0,
                 offset: int = 0, whole: bool = True) -> None:
        self.param, self.grad, self.states = param, grad, states
        self.ordinal = ordinal  # the parameter's position in the optimizer (seeds its rounding noise)
        self.offset = offset  # flat index of this piece's first element in what ``ordinal`` names
        self.whole = whole  # one whole parameter (per-tensor projections apply to it), not a flat buffer


def _is_number(value: Any) -> bool:
    """A hyperparameter that cannot change in place: a Python number, flag, string or None, or a tuple of them."""
    if isinstance(value, tuple):
        return all(map(_is_number, value))
    return value is None or isinstance(value, (int, float, str))


_grad_of = attrgetter("grad")
_nbytes_of = attrgetter("nbytes")


class NativeGroup:
    """A param group whose last step was one native loop over all its parameters, kept so that the next
    step checks what it found instead of rebuilding it (:meth:`BucketEngine.step_remembered`).

    Holds the group's parameters, their state dicts and state tensors, the parameters' addresses and
    sizes, the loop's address table (gradients left to fill in), the packed step counter, and the
    kernel and scalars of the group's hyperparameters as last read. Gradients are never held: they
    are read afresh every step. State tensors are checked by identity, not address; their storage is
    held (by aliases) so that the loop never writes to freed memory even if a state tensor's
    ``.data`` were replaced (optimizer state is the optimizer's: to change it, put another tensor in
    the state dict, which the next step notices).
    """

    __slots__ = ("held", "hyper_keys", "idle", "keep", "kernel", "keys", "live", "members", "nbytes", "params",
                 "params_list", "per_step", "pointers", "runner", "scalars", "sizes", "state_of", "state_tensors",
                 "states", "step", "stride", "values", "version", "w_pointers")

    def __init__(self, runner: NativeEngine, group: dict[str, Any], keys: list[str], items: list[_Item],
                 params: list[Tensor], states: list[dict[str, Any]], step: Tensor, idle: list[Tensor]) -> None:
        self.runner = runner
        self.params_list: list[Tensor] = group["params"]
        self.members = list(self.params_list)  # the group's parameters, as they were
        self.params = params  # those the loop steps, in its order
        self.idle = idle  # the others, which had no gradient (frozen)
        self.keys = list(keys)
        self.states = states
        # a tuple of a state dict's tensors: the step counter and the live rules' state
        self.state_of = itemgetter("step", *keys) if keys else itemgetter("step", "step")
        self.state_tensors = list(chain.from_iterable(map(self.state_of, states)))
        self.held = [t.detach() for t in self.state_tensors]
        # int64 arrays, not lists of ints: comparing them reads two buffers, not 200 scattered objects
        self.w_pointers = array.array("q", [p.data_ptr() for p in self.params])
        self.nbytes = array.array("q", [p.nbytes for p in self.params])
        _, pointers, sizes, _ = runner.split(items)  # per item: w, g, then its state tensors; its size
        self.pointers, self.sizes = array.array("q", pointers), array.array("q", sizes)
        self.stride = 2 + len(keys)
        self.step = step
        self.version = tensor_version(step._base)  # the loop advances the counters without changing it
        self.hyper_keys = tuple(key for key in group if key != "params")
        self.values: list[Any] | None = None  # the hyperparameters the kernel and scalars were read from
        self.live: Live | None = None  # their live rules and decay factor, if they are all numbers
        self.keep: Any = None
        self.per_step = False  # a rule has per-step scalars
        self.kernel: native.Kernel | None = None
        self.scalars = array.array("d")

    def read_hyper(self, plan: Plan, group: dict[str, Any]) -> bool:
        """Whether the group's hyperparameters still run on the remembered loop (the same state keys). The
        kernel and scalars are read anew when they change, or every step where a hyperparameter is a
        tensor (it may change in place); per-step scalars (Adam's bias corrections) every step."""
        try:
            values = list(map(group.__getitem__, self.hyper_keys))
            same = self.live is not None and values == self.values
        except (KeyError, RuntimeError):  # a key deleted; a tensor that is not one number
            return False
        if same:
            if self.per_step:
                self.scalars = array.array("d", step_scalars(self.live, self.keep, int(self.step.item()) + 1)[0])
            return True
        live = live_rules(plan, group, None)
        if state_keys(live) != self.keys:
            return False
        keep = weight_keep(plan, group)
        prepared = self.runner.prepare(group, live, keep, int(self.step.item()) + 1)
        if prepared is None:
            return False
        self.kernel, scalars = prepared
        self.scalars = array.array("d", scalars)
        self.values = values
        # numbers cannot change in place: while they compare equal, only per-step scalars need reading
        self.live, self.keep = (live, keep) if all(map(_is_number, values)) else (None, None)
        self.per_step = any(type(rule).scalars is not Rule.scalars for rule, _ in live)
        return True

    def gradient_pointers(self, group: dict[str, Any], all_state: Any) -> array.array | None:
        """The addresses of this step's gradients if the group is as it was remembered (None otherwise):
        the same parameters, those without a gradient still without, the others each at the same
        address, of the same size and contiguous, each with a contiguous gradient of its size (torch
        keeps a gradient's dtype the parameter's); the same state dicts holding the same state tensors."""
        params, members = self.params, self.members
        if (group["params"] is not self.params_list or len(self.params_list) != len(members)
                or not all(map(is_, self.params_list, members))
                or (self.idle and not all(map(is_, map(_grad_of, self.idle), repeat(None))))):
            return None
        grads = list(map(_grad_of, params))
        try:  # a missing gradient (None) raises TypeError
            if not all(map(Tensor.is_contiguous, grads)) or array.array("q", map(_nbytes_of, grads)) != self.nbytes:
                return None
        except TypeError:
            return None
        if (array.array("q", map(Tensor.data_ptr, params)) != self.w_pointers
                or not all(map(Tensor.is_contiguous, params))
                or array.array("q", map(_nbytes_of, params)) != self.nbytes):
            return None
        try:
            if (not all(map(is_, map(all_state.__getitem__, params), self.states))
                    or not all(map(is_, chain.from_iterable(map(self.state_of, self.states)), self.state_tensors))):
                return None
        except KeyError:
            return None
        return array.array("q", map(Tensor.data_ptr, grads))


class BucketEngine(Engine):
    """Shared by the multi-tensor engines: sorts a group's parameters into buckets, then runs each.

    A bucket holds the parameters of one group with the same device, dtype and step count whose
    state already exists; everything else (first steps, zero-size tensors) takes the reference path.
    """

    def __init__(self, plan: Plan, source: Source) -> None:
        super().__init__(plan, source)
        self.reference = ReferenceEngine(plan, source)
        self.counters = StepCounters()
        self.remembered: dict[int, NativeGroup] = {}  # by group index
        # state tensors check_state passed (by id, with a weak reference: the same tensor, not a successor
        # at its address); a state tensor is the optimizer's, so one that passed once fits its parameter
        self.fitting: dict[int, weakref.ref[Tensor]] = {}
        self.disjoint: dict[int, array.array] = {}  # by group index: addresses of parameters known not to overlap

    def reset(self) -> None:
        self.counters.reset()
        self.remembered.clear()
        self.fitting.clear()
        if self.plan.layout is not None:  # the state was replaced: check the flat buffers in full
            self.plan.layout.invalidate()

    def native_runner(self, items: list[_Item]) -> NativeEngine | None:
        """The native engine whose last bucket run stepped every one of ``items`` in its loop, if any."""
        return None

    def step_remembered(self, gi: int, group: dict[str, Any]) -> bool:
        """Step group ``gi`` as its last step did (one native loop over all its parameters) if nothing
        that step relied on has changed; False (nothing done, the group forgotten) otherwise."""
        remembered = self.remembered.get(gi)
        if remembered is None:
            return False
        if (tensor_version(remembered.step._base) != remembered.version  # a counter changed in place
                or not remembered.read_hyper(self.plan, group)
                or (grads := remembered.gradient_pointers(group, self.source.state)) is None):
            del self.remembered[gi]
            return False
        pointers = remembered.pointers[:]
        pointers[1::remembered.stride] = grads
        remembered.kernel(pointers, remembered.sizes, remembered.scalars, counters=remembered.step._base)
        remembered.runner.project(group, remembered.params)
        return True

    def step(self, grad_scale: Tensor | None = None) -> None:
        widen = rounds_stochastically(self.plan)
        layout = self.plan.layout
        all_state = self.source.state
        groups = self.source.param_groups
        clip = clip_coefficients(self.plan, groups, grad_scale)
        for gi, group in enumerate(groups):
            if clip is None and grad_scale is None and self.remembered and self.step_remembered(gi, group):
                continue
            live = live_rules(self.plan, group, None if clip is None else clip[gi])
            keep = weight_keep(self.plan, group)
            keys = state_keys(live)
            # per (device, dtype, grad dtype): the items, their parameters and their state dicts
            buckets: dict[tuple[Any, ...], tuple[list[_Item], list[Tensor], list[dict[str, Any]]]] = {}
            needed = {"step", *keys}
            loose = group["params"]  # the parameters to step one by one
            if layout is not None:
                buffers = layout.intact_buffers(gi)
                flat_ids = {id(p) for b in buffers for p in b.params}
                loose = [p for p in loose if id(p) not in flat_ids]
                for buffer in buffers:
                    if not self.step_flat(buffer, group, live, keep, keys, grad_scale):
                        buffer.invalidate()  # its parameters step one by one: their counts may part
                        loose += buffer.params
            idle = [p for p in loose if p.grad is None]  # parameters without a gradient
            stepping = [p for p in loose if p.grad is not None] if idle else loose
            if len(stepping) > 1 and self.overlap(gi, stepping):
                # parameters that share memory see each other's updates: step them in the reference engine's
                # order (a bucket steps them together, the native loop even on several threads at once)
                for p in stepping:
                    self.reference.step_param(p, group, live, keep, grad_scale)
                continue
            state_dtype = self.plan.state_dtype
            for p in stepping:
                g = p.grad
                if g.is_sparse or p.is_complex():
                    check_grad(p)  # raises
                state = all_state[p]
                if p.numel() == 0 or not needed <= state.keys():
                    self.reference.step_param(p, group, live, keep, grad_scale)
                    continue
                states = [state[k] for k in keys]
                fitting = self.fitting
                for t in states:
                    known = fitting.get(id(t))
                    if known is None or known() is not t:
                        check_state(p, state, keys, state_dtype)
                        fitting.update((id(u), weakref.ref(u)) for u in states)
                        break
                key = (p.device, p.dtype, g.dtype)  # and equal step counts: StepCounters.groups
                if isinstance(p, DTensor):  # the rules are elementwise: a sharded parameter steps on its shard
                    item = _Item(_local(p), _local(g), [_local(t) for t in states])
                else:
                    item = _Item(p, g, states)
                if widen:  # only rounding noise needs the parameter's position
                    item.ordinal, item.offset = self.position(p)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = ([], [], [])
                bucket[0].append(item)
                bucket[1].append(p)
                bucket[2].append(state)
            for items, ps, states in buckets.values():
                counts = self.counters.groups(states)
                for positions, step in counts:
                    whole = len(positions) == len(items)
                    self.run_bucket(group, live, keep, items if whole else [items[i] for i in positions], step,
                                    grad_scale)
                    self.project(group, ps if whole else [ps[i] for i in positions])
                # one bucket, one step count, every parameter with a gradient in it and stepped by the native
                # loop: remember
                if (len(buckets) == 1 and len(counts) == 1 and len(items) + len(idle) == len(group["params"])
                        and not widen
                        and layout is None and clip is None and grad_scale is None
                        and all(map(is_, (i.param for i in items), ps))):
                    runner = self.native_runner(items)
                    if runner is not None:
                        remembered = NativeGroup(runner, group, keys, items, ps, states, counts[0][1], idle)
                        if remembered.read_hyper(self.plan, group):
                            self.remembered[gi] = remembered

    def overlap(self, gi: int, params: list[Tensor]) -> bool:
        """Whether two of group ``gi``'s ``params`` share memory (:func:`tensors_overlap`), read again only when
        their addresses or sizes change."""
        params = [_local(p) for p in params]
        addresses = array.array("q", chain(map(Tensor.data_ptr, params), map(_nbytes_of, params)))
        if self.disjoint.get(gi) == addresses:
            return False
        if tensors_overlap(params):
            return True
        if len(self.disjoint) > 256:
            self.disjoint.clear()
        self.disjoint[gi] = addresses
        return False

    def step_flat(self, buffer: FlatBuffer, group: dict[str, Any], live: Live, keep: Any, keys: list[str],
                  grad_scale: Tensor | None) -> bool:
        """Step a flat buffer's parameters as one tensor; False (nothing done) where that would differ
        from stepping them one by one (a parameter without gradient or state, unequal step counts)."""
        if not buffer.gather_grads() or not buffer.ready(self.source.state, keys, self.plan.state_dtype):
            return False
        item = _Item(buffer.rows(buffer.data), buffer.rows(buffer.grad), [buffer.rows(buffer.states[k]) for k in keys],
                     buffer.ordinal, 0, whole=False)
        states = buffer.state_dicts
        if not self.counters.packed([s["step"] for s in states]) and not buffer.same_step_counts(self.source.state):
            return False  # a counter changed in place since the buffer last stepped as one
        step = self.counters.advance(states)
        self.run_bucket(group, live, keep, [item], step, grad_scale)
        self.project(group, buffer.params)
        return True

    def run_bucket(self, group: dict[str, Any], live: Live, keep: Any, items: list[_Item], step: Tensor,
                   grad_scale: Tensor | None) -> None:
        """Apply the chain to the bucket's parameters (``w <- keep*w + u``); ``step`` (0-d, incremented) is shared."""
        raise NotImplementedError

    def project(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Apply the chain's projections to updated parameters (box elementwise, ball per whole tensor)."""
        self.apply_projections(self.plan.projections, group, params)

    def apply_projections(self, projections: Sequence[WeightRule], group: dict[str, Any], params: list[Tensor]) -> None:
        """Apply ``projections`` to updated parameters (box elementwise, ball per whole tensor)."""
        for projection in projections:
            hp = projection.read(group)
            if projection.elementwise:  # one multi-tensor pass over every parameter's local shard
                projection.project_(TensorList([_local(p) for p in params]), hp)  # type: ignore[arg-type]
            else:
                for p in params:
                    projection.project_(p, hp)


def _chunks(items: list[_Item], limit: int) -> Iterator[list[_Item]]:
    """The bucket in pieces of at most ``limit`` elements; contiguous tensors are cut as flat views."""
    piece: list[_Item] = []
    size = 0
    for item in items:
        tensors = [item.param, item.grad, *item.states]
        n = item.param.numel()
        if n > limit and _flat_ok(tensors):
            flat = _Item(item.param.view(-1), item.grad.view(-1),
                         [t.view(-1) for t in item.states], item.ordinal)
            for start in range(0, n, limit):
                stop = min(start + limit, n)
                part = _Item(flat.param[start:stop], flat.grad[start:stop],
                             [t[start:stop] for t in flat.states], item.ordinal, item.offset + start, whole=False)
                if size + (stop - start) > limit and piece:
                    yield piece
                    piece, size = [], 0
                piece.append(part)
                size += stop - start
            continue
        if size + n > limit and piece:
            yield piece
            piece, size = [], 0
        piece.append(item)
        size += n
    if piece:
        yield piece


class ForeachEngine(BucketEngine):
    """Multi-tensor execution: each rule runs once per chunk of a bucket, over a ``TensorList``."""

    name = "foreach"

    def __init__(self, plan: Plan, source: Source, chunk: int = CHUNK, scratch_min_mean: int = 1 << 14) -> None:
        super().__init__(plan, source)
        self.chunk = chunk
        self.scratch_min_mean = scratch_min_mean
        self.scratch = Scratch(chunk, scratch_min_mean)

    def reset(self) -> None:
        super().reset()
        self.scratch = Scratch(self.chunk, self.scratch_min_mean)

    def run_bucket(self, group: dict[str, Any], live: Live, keep: Any, items: list[_Item], step: Tensor,
                   grad_scale: Tensor | None) -> None:
        step_value = int(step.item())
        live = with_scalars(live, step_value)
        widen = rounds_stochastically(self.plan)
        scratch = self.scratch
        scale = None if grad_scale is None else grad_scale.to(items[0].param.device, torch.float32)
        layout = state_layout(live)
        seeds: list[list[dict[int, int]]] = []  # per rule, per state tensor: {ordinal: seed}
        if widen:
            ordinals = [item.ordinal for item in items]
            seeds = [[dict(zip(ordinals, s.tolist())) for s in per_rule]
                     for per_rule in bucket_seeds(items, step, layout)]
        for piece in _chunks(items, self.chunk):
            scratch.reset()  # every temporary of the previous chunk is dead
            w = TensorList([item.param for item in piece], scratch)
            u = TensorList([item.grad for item in piece], scratch)
            if scale is not None:
                u = u / scale
            if group["maximize"]:
                u = -u
            columns = state_columns(piece, layout)
            for r, (rule, hp) in enumerate(live):
                view = {k: TensorList(columns[r][j], scratch) for j, k in enumerate(layout[r])}
                work = {k: v.to(torch.float32) for k, v in view.items()} if widen else view
                u = rule.update(u, w, work, hp, step_value)  # type: ignore[arg-type]
                if widen:
                    for j, (k, v) in enumerate(view.items()):
                        self.write_back(v, work[k], piece, seeds[r][j])
            if keep != 1:
                w.mul_(keep)
            w.add_(u)

    def write_back(self, state: TensorList, work: TensorList, piece: list[_Item], seeds: dict[int, int]) -> None:
        """Low-precision state <- its float32 working copy, rounded stochastically (scratch buffers).

        ``seeds`` maps each parameter's ordinal to this state tensor's seed for the step.
        """
        if state is work:
            return
        noise = self.scratch.take(work.tensors, torch.int32)
        spare = self.scratch.take(work.tensors, torch.int32)
        nan = self.scratch.take(work.tensors, torch.bool)
        for i, (dst, src, item) in enumerate(zip(state.tensors, work.tensors, piece)):
            seed = seeds[item.ordinal]
            if (noise is None or spare is None or nan is None or dst.dtype not in LOW_PRECISION
                    or src.dtype != torch.float32):
                write_back_(dst, src, seed, item.offset)
            else:
                stochastic_round_into_(dst, src, noise[i], spare[i], nan[i], seed, item.offset)


def _as_tensors(hp: dict[str, Any], static: tuple[str, ...], dtype: torch.dtype = torch.float64,
                traced: bool = False) -> dict[str, Any]:
    """Hyperparameters as 0-d ``dtype`` tensors (static flags and non-numbers stay as they are).

    ``traced``: inside a step ``torch.compile`` traces, a number ``x`` becomes ``ones(()) * x``, an
    operation dynamo keeps symbolic in ``x``; ``torch.tensor(x)`` would make ``x`` a constant of the graph
    and recompile it whenever ``x`` changes.
    """
    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return torch.ones((), dtype=dtype) * value if traced else torch.tensor(float(value), dtype=dtype)
        if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(convert(v) for v in value)
        return value
    return {k: (v if k in static else convert(v)) for k, v in hp.items()}


def _static_key(value: Any) -> Any:
    """The part of a hyperparameter a compiled step specialises on: its value if static, else its kind."""
    if isinstance(value, tuple):
        return tuple(_static_key(v) for v in value)
    if isinstance(value, Tensor):
        return ("tensor", value.dtype, value.device)
    return type(value).__name__


def _bucket_step(rules: tuple[Rule, ...], projections: tuple[WeightRule, ...], maximize: bool, widen: bool,
                 state_keys: tuple[tuple[str, ...], ...], params: list[Tensor], grads: list[Tensor],
                 states: list[list[list[Tensor]]], hps: list[dict[str, Any]], phps: list[dict[str, Any]],
                 keep: Tensor | None, step: Tensor, grad_scale: Tensor | None, seeds: list[list[Tensor]],
                 offsets: list[int], lanes: Tensor | None) -> None:
    """The chain over every parameter of a bucket, written for ``torch.compile`` to fuse.

    ``states[r][j]`` holds rule ``r``'s state tensor called ``state_keys[r][j]`` for every parameter:
    flat lists of tensors, not a dict per parameter, because dynamo guards every container it is
    given on every call (a dict per parameter cost more per step than the rest of the guards).
    ``seeds[r][j]`` (int32, one per parameter) seed the rounding noise of that tensor when state is
    kept in low precision (empty otherwise); ``offsets`` give each tensor's first flat index for it,
    and ``lanes`` (``arange(LANES)``) lets a flat buffer's ``[rows, LANES]`` view build that index cheaply.
    """
    for i, (w, g) in enumerate(zip(params, grads)):
        u = g / grad_scale if grad_scale is not None else g
        u = -u if maximize else u
        for r, rule in enumerate(rules):
            view = {k: states[r][j][i] for j, k in enumerate(state_keys[r])}
            work = {k: v.float() for k, v in view.items()} if widen else view
            u = rule.update(u, w, work, hps[r], step)
            if widen:
                for j, (k, v) in enumerate(view.items()):
                    noise = element_noise(seeds[r][j][i], work[k], offsets[i], lanes)
                    v.copy_(stochastic_round(work[k], v.dtype, noise))
        if keep is not None:
            w.mul_(keep)
        w.add_(u)
        for projection, php in zip(projections, phps):
            projection.project_(w, php)


def _fresh_function(fn: Callable[..., Any], tag: int) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object, hence its own dynamo cache and recompile budget."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def inductor_options(low_precision_state: bool) -> dict[str, Any]:
    """The inductor settings of a compiled step.

    ``size_asserts`` off: they re-check every input's shape and stride on each call, which dynamo's
    guards have just done. For state kept in bfloat16 on an AVX-512 CPU, 256-bit vectors:
    inductor's loops take 16 floats per iteration, so 16 bf16 values are half a 512-bit vector,
    loaded and stored with masked instructions; at 256 bits they are plain loads and stores.
    """
    options: dict[str, Any] = {"size_asserts": False}
    if low_precision_state:
        try:
            from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list

            if pick_vec_isa().bit_width() == 512 and any(isa.bit_width() == 256 for isa in valid_vec_isa_list()):
                options["cpp.simdlen"] = 256
        except Exception:  # pragma: no cover  (inductor internals moved: keep its default width)
            pass
    return options


class CompiledEngine(BucketEngine):
    """One ``torch.compile``-fused pass per bucket; falls back to :class:`ForeachEngine` if compiling fails.

    Args:
        plan: what to run.
        source: the optimizer (param groups and state).
        backend: the ``torch.compile`` backend (``"inductor"``; tests use a counting backend).
        quiet: report a compile failure in the ``descend.optim`` log instead of a ``RuntimeWarning``
            (``engine="auto"``, where the user asked for no engine in particular).
    """

    name = "compiled"

    def __init__(self, plan: Plan, source: Source, backend: Any = "inductor", quiet: bool = False) -> None:
        super().__init__(plan, source)
        self.backend = backend
        self.quiet = quiet
        self.fallback: ForeachEngine | None = None
        self.cache: dict[tuple[Any, ...], Callable[..., None]] = {}
        self.outside: list[WeightRule] = []  # projections the last compiled step left to project()
        self.lanes: dict[torch.device, Tensor] = {}

    def lanes_on(self, device: torch.device) -> Tensor:
        """``arange(LANES)`` (int32) on ``device``: the column index of a flat buffer's ``[rows, LANES]`` view."""
        if device not in self.lanes:
            self.lanes[device] = torch.arange(LANES, dtype=torch.int32, device=device)
        return self.lanes[device]

    def reset(self) -> None:
        super().reset()
        self.cache.clear()

    def run_bucket(self, group: dict[str, Any], live: Live, keep: Any, items: list[_Item], step: Tensor,
                   grad_scale: Tensor | None) -> None:
        if self.fallback is not None:
            self.fallback.run_bucket(group, live, keep, items, step, grad_scale)
            return
        # a 0-d tensor meeting a 0-d float64 hyperparameter would be promoted to float64; a 1-element view is not
        items = [_Item(it.param.view(1), it.grad.view(1), [t.view(1) for t in it.states], it.ordinal, it.offset,
                       it.whole) if it.param.dim() == 0 else it for it in items]
        rules = tuple(rule for rule, _ in live)
        # a ball projection needs each parameter whole: a flat buffer's are applied after the step
        whole = all(item.whole for item in items)
        projections = tuple(pr for pr in self.plan.projections if whole or pr.elementwise)
        self.outside = [pr for pr in self.plan.projections if pr not in projections]
        params = [item.param for item in items]
        live = with_scalars(live, int(step.item()))
        hps = [_as_tensors(hp, rule.static) for rule, hp in live]
        phps = [_as_tensors(projection.read(group), ()) for projection in projections]
        widen = rounds_stochastically(self.plan)
        no_decay = isinstance(keep, (int, float)) and keep == 1
        keep_t = None if no_decay else torch.tensor(float(keep), dtype=torch.float64)
        key = (rules, bool(group["maximize"]), widen, grad_scale is not None, keep_t is None,
               tuple((hp[k] if k in rule.static else _static_key(v)) for (rule, hp), hps_r in zip(live, hps)
                     for k, v in hps_r.items()),
               # the bucket shares device and dtypes; shapes and strides per tensor. dynamo's own guards
               # check every input as well, so a difference this key misses recompiles instead of failing.
               params[0].device, params[0].dtype, items[0].grad.dtype,
               tuple(t.dtype for t in items[0].states),
               tuple((p.shape, p.stride()) for p in params))
        scale = None if grad_scale is None else grad_scale.to(params[0].device, torch.float32)
        state_keys = state_layout(live)
        states = state_columns(items, state_keys)
        seeds = bucket_seeds(items, step, state_keys) if widen else []
        try:  # torch.compile itself raises where dynamo is unsupported (some Python versions, platforms)
            fn = self.cache.get(key)
            if fn is None:
                options = inductor_options(widen) if self.backend == "inductor" else None
                fn = torch.compile(_fresh_function(_bucket_step, len(self.cache)), backend=self.backend,
                                   fullgraph=True, dynamic=False, options=options)
                self.cache[key] = fn
            fn(rules, projections, bool(group["maximize"]), widen, state_keys, params, [item.grad for item in items],
               states, hps, phps, keep_t, step, scale, seeds, [item.offset for item in items] if widen else [],
               self.lanes_on(params[0].device) if widen else None)
        except Exception as err:  # no compiler, an unsupported op: run the same rules without one
            message = (f"descend: engine='compiled' could not compile the optimizer step "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                       "falling back to engine='foreach'")
            if self.quiet:
                logger.info(message)
            else:
                warnings.warn(message, RuntimeWarning, stacklevel=4)
            self.fallback = ForeachEngine(self.plan, self.source)
            self.cache.clear()
            self.fallback.run_bucket(group, live, keep, items, step, grad_scale)

    def project(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if self.fallback is not None:
            super().project(group, params)
        else:  # the compiled step projects inside its fused pass, except what it left outside
            self.apply_projections(self.outside, group, params)


class NativeEngine(BucketEngine):
    """The chain as one generated C loop per bucket (:mod:`descend.optim.engines.native.compiler`), on float32 CPU.

    State may be float32 or bfloat16 (widened on load, written back with the stochastic rounding
    every engine uses). A bucket it cannot run (another device or dtype, a non-contiguous tensor, a
    ``grad_scale``, a rule the tracer cannot express) runs on the foreach engine, as
    does everything once compiling has failed (logged, or warned with ``engine="native"``).
    Projections apply after the loop, as the foreach engine applies them.
    """

    name = "native"

    def __init__(self, plan: Plan, source: Source, quiet: bool = False, foreach: ForeachEngine | None = None) -> None:
        super().__init__(plan, source)
        self.quiet = quiet
        self.foreach = foreach or ForeachEngine(plan, source)
        self.kernels: dict[tuple[Any, ...], native.Kernel | None] = {}
        self.broken = False  # compiling failed: no compiler here
        self.stepped: list[_Item] | None = None  # the last bucket, if the loop stepped all of it

    def reset(self) -> None:
        super().reset()
        self.foreach.reset()

    def supports(self, items: list[_Item], grad_scale: Tensor | None) -> bool:
        """Whether the native loop may step this bucket: float32 CPU parameters and gradients, float32 or
        bfloat16 state, no unscaling (:meth:`split` checks each tensor)."""
        if self.broken or grad_scale is not None or not items or self.plan.state_dtype not in NATIVE_STATE:
            return False
        p0 = items[0].param
        return p0.device.type == "cpu" and p0.dtype == torch.float32 and items[0].grad.dtype == torch.float32

    def split(self, items: list[_Item]) -> tuple[list[_Item], list[int], list[int], list[_Item]]:
        """The items the loop can step (every tensor contiguous, the state of the optimizer's state dtype)
        with the addresses of their ``w``, ``g`` and state and their sizes; and the rest. A bucket shares
        ``w``'s and ``g``'s dtypes, which :meth:`supports` has checked (float32)."""
        state_dtype = self.plan.state_dtype or torch.float32
        ready: list[_Item] = []
        pointers: list[int] = []
        sizes: list[int] = []
        rest: list[_Item] = []
        for item in items:
            w, g = item.param, item.grad
            ok = w.is_contiguous() and g.is_contiguous()
            addresses = [w.data_ptr(), g.data_ptr()] if ok else []
            for t in item.states if ok else ():
                if t.dtype != state_dtype or not t.is_contiguous():
                    ok = False
                    break
                addresses.append(t.data_ptr())
            if ok:
                ready.append(item)
                pointers += addresses
                sizes.append(w.numel())
            else:
                rest.append(item)
        return ready, pointers, sizes, rest

    def kernel(self, live: Live, maximize: bool, decays: bool,
               shapes: tuple[tuple[Any, ...], ...]) -> native.Kernel | None:
        """The compiled loop for this chain and hyperparameter shape (None: the tracer cannot express it)."""
        rules = tuple(rule for rule, _ in live)
        bf16 = rounds_stochastically(self.plan)
        key = (rules, maximize, decays, shapes, bf16)
        if key not in self.kernels:
            layout = state_layout(live)
            try:
                source = native.trace_chain(rules, layout, shapes, maximize, decays, bf16_state=bf16)
            except native.NotTraceable as err:
                logger.info("descend: engine=%r runs %s on the foreach engine: %s",
                            self.name, self.plan.describe(), err)
                self.kernels[key] = None
                return None
            try:
                self.kernels[key] = native.compile_kernel(source, 2 + sum(len(names) for names in layout))
            except (RuntimeError, OSError) as err:
                message = (f"descend: engine='native' could not compile the optimizer step ({err}); "
                           "using engine='foreach'")
                if self.quiet:
                    logger.info(message)
                else:
                    warnings.warn(message, RuntimeWarning, stacklevel=5)
                self.broken = True
                return None
        return self.kernels[key]

    def native_runner(self, items: list[_Item]) -> NativeEngine | None:
        return self if self.stepped is items else None

    def run_bucket(self, group: dict[str, Any], live: Live, keep: Any, items: list[_Item], step: Tensor,
                   grad_scale: Tensor | None) -> None:
        self.stepped = None
        if self.supports(items, grad_scale):
            ready, pointers, sizes, rest = self.split(items)  # e.g. a transposed parameter: the rest
            if any(item.param.dim() == 0 for item in ready) and reads_float64_tensor(live, keep):
                # a 0-d parameter times a 0-d float64 tensor is computed in float64 (torch's promotion of
                # two 0-d operands); the loop computes in float32, so such parameters take the foreach path
                ready, pointers, sizes, rest = self.split([item for item in items if item.param.dim() != 0])
                rest += [item for item in items if item.param.dim() == 0]
            if ready and self.run_native(group, live, keep, ready, pointers, sizes, step):
                if rest:
                    self.foreach.run_bucket(group, live, keep, rest, step, grad_scale)
                else:
                    self.stepped = items
                return
        self.foreach.run_bucket(group, live, keep, items, step, grad_scale)

    def prepare(self, group: dict[str, Any], live: Live, keep: Any,
                step: int) -> tuple[native.Kernel, list[float]] | None:
        """The compiled loop for this chain and its scalars at step number ``step`` (see
        :func:`step_scalars`); None if the chain has no loop."""
        try:
            scalars, shapes, decays = step_scalars(live, keep, step)
        except native.NotTraceable:
            return None
        kernel = self.kernel(live, bool(group["maximize"]), decays, shapes)
        return None if kernel is None else (kernel, scalars)

    def run_native(self, group: dict[str, Any], live: Live, keep: Any, items: list[_Item],
                   pointers: Sequence[int], sizes: Sequence[int], step: Tensor) -> bool:
        """Step ``items`` (at ``pointers``: per item ``w``, ``g``, its state tensors) with the compiled
        loop; False (nothing done) if the chain has none."""
        prepared = self.prepare(group, live, keep, int(step.item()))
        if prepared is None:
            return False
        kernel, scalars = prepared
        if rounds_stochastically(self.plan):  # per tensor and state, the seeds of its rounding noise
            columns = [s for per_rule in bucket_seeds(items, step, state_layout(live)) for s in per_rule]
            seeds = torch.stack(columns, dim=1).contiguous() if columns else None
            kernel(pointers, sizes, scalars, [item.offset for item in items], seeds)
        else:
            kernel(pointers, sizes, scalars)
        return True


def reads_float64_tensor(live: Live, keep: Any) -> bool:
    """Whether a live hyperparameter or the decay factor ``keep`` is a float64 tensor (or holds one)."""
    def double(value: Any) -> bool:
        if isinstance(value, tuple):
            return any(double(v) for v in value)
        return torch.is_tensor(value) and value.dtype == torch.float64

    return double(keep) or any(double(value) for _, hp in live for value in hp.values())


def is_torch_chain(rules: Sequence[Rule], decays: Sequence[Rule], projections: Sequence[WeightRule]) -> bool:
    """Whether a chain is torch's Adam, AdamW or SGD (``[l2] adam|heavy_ball scale_by_lr [decay]``)."""
    kinds = [type(rule) for rule in rules]
    if kinds and kinds[0] is L2:
        kinds = kinds[1:]
    return (not projections and kinds in ([ScaleByAdam, ScaleByLR], [HeavyBall, ScaleByLR], [ScaleByLR])
            and len(decays) <= 1 and all(isinstance(d, DecoupledDecay) and d.lr_scaled for d in decays))


def torch_kernel(live: Live, decays: Sequence[Rule], projections: Sequence[WeightRule], group: dict[str, Any],
                 items: list[_Item], step: Tensor, grad_scale: Tensor | None,
                 rounding: bool = False) -> Callable[[], None] | None:
    """torch's fused kernel that computes this bucket's step, as a call ready to run, or None.

    A bucket qualifies when its live chain is exactly torch's Adam (``[l2] adam scale_by_lr``), AdamW
    (``adam scale_by_lr`` with lr-scaled decoupled decay) or SGD (``[l2] [heavy_ball] scale_by_lr``),
    with no projection, no clipping, no ``grad_scale`` (torch's kernels unscale ``.grad`` in place;
    the chain leaves it as it is) and no stochastic rounding of the state (``rounding``: torch's
    kernels round to nearest), and parameters, gradients and state share one dtype on a device torch
    has fused kernels for. Not SGD in half precision on the CPU: torch 2.13's kernel leaves such
    weights unchanged.
    """
    if grad_scale is not None or projections or not items or rounding:
        return None
    kinds = [type(rule) for rule, _ in live]
    hps = [hp for _, hp in live]
    active_decays = [rule for rule in decays if rule.active(rule.read(group))]
    if len(active_decays) > 1 or any(not getattr(rule, "lr_scaled", False) for rule in active_decays):
        return None
    l2 = 0.0
    if kinds and kinds[0] is L2:
        l2 = float(hps[0]["weight_decay"])
        kinds, hps = kinds[1:], hps[1:]
    if active_decays and l2:
        return None
    p0 = items[0].param
    dtype = p0.dtype
    # a bucket shares the parameters' and the gradients' dtype (BucketEngine.step keys on both), and its
    # state has the parameters' dtype unless the optimizer keeps it in low precision, which it does for every
    # parameter: the first parameter's state speaks for the bucket (torch's kernel checks every tensor)
    if (p0.device.type not in FUSED_DEVICES or not dtype.is_floating_point or items[0].grad.dtype != dtype
            or any(t.dtype != dtype for t in items[0].states)):
        return None
    params = [it.param for it in items]
    grads = [it.grad for it in items]
    lr = group["lr"]
    lr = float(lr) if not torch.is_tensor(lr) else lr
    maximize = bool(group["maximize"])
    if kinds == [ScaleByAdam, ScaleByLR]:
        hp = hps[0]
        amsgrad = bool(hp["amsgrad"])
        beta1, beta2 = (float(b) for b in hp["betas"])
        columns = [[it.states[j] for it in items] for j in range(3 if amsgrad else 2)]
        if active_decays:
            fn, weight_decay = torch._fused_adamw_, float(active_decays[0].read(group)["weight_decay"])
        else:
            fn, weight_decay = torch._fused_adam_, l2

        steps = [step.to(p0.device, torch.float32)] * len(params)  # read, not advanced, by the kernel

        def adam() -> None:
            fn(params, grads, columns[0], columns[1], columns[2] if amsgrad else [], steps,
               lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=float(hp["eps"]),
               amsgrad=amsgrad, maximize=maximize)
        return adam
    if active_decays:
        return None
    if kinds in ([HeavyBall, ScaleByLR], [ScaleByLR]):
        if p0.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            return None
        hp = hps[0] if kinds[0] is HeavyBall else {"momentum": 0.0, "dampening": 0.0, "nesterov": False}
        buffers = [it.states[0] for it in items] if kinds[0] is HeavyBall else []

        def sgd() -> None:
            torch._fused_sgd_(params, grads, buffers, weight_decay=l2, momentum=float(hp["momentum"]), lr=lr,
                              dampening=float(hp["dampening"]), nesterov=bool(hp["nesterov"]), maximize=maximize,
                              is_first_step=False)
        return sgd
    return None


class FusedEngine(BucketEngine):
    """torch's fused kernels for the buckets :func:`torch_kernel` matches (``engine="fused"``).

    The chain must be one of torch's (Adam, AdamW, SGD); a bucket that is not (a ``grad_scale``, a
    parameter dtype without a kernel) runs on the foreach engine.
    """

    name = "fused"

    def __init__(self, plan: Plan, source: Source) -> None:
        super().__init__(plan, source)
        if self.name == "fused" and not is_torch_chain(plan.rules, plan.decays, plan.projections):
            chain = plan.describe()
            raise ValueError(f"engine='fused' (fused=True) runs torch's Adam, AdamW and SGD kernels; this chain "
                             f"({chain}) is none of them: use engine='auto' or engine='compiled'")
        self.foreach = ForeachEngine(plan, source)
        self.last: BucketEngine = self

    def reset(self) -> None:
        super().reset()
        self.foreach.reset()

    def fallback(self, items: list[_Item]) -> BucketEngine:
        """The engine for a bucket no torch kernel matches."""
        return self.foreach

    def run_bucket(self, group: dict[str, Any], live: Live, keep: Any, items: list[_Item], step: Tensor,
                   grad_scale: Tensor | None) -> None:
        kernel = torch_kernel(live, self.plan.decays, self.plan.projections, group, items, step, grad_scale,
                              rounds_stochastically(self.plan))
        if kernel is not None:
            self.last = self
            kernel()
        else:
            self.last = self.fallback(items)
            self.last.run_bucket(group, live, keep, items, step, grad_scale)


class AutoEngine(FusedEngine):
    """``engine="auto"``: per bucket, on the CPU the native loop for every chain (foreach for what it cannot
    run); elsewhere torch's fused Adam, AdamW or SGD kernel, the compiled step for a large flat buffer, or
    the foreach engine (see the module docstring)."""

    name = "auto"

    def __init__(self, plan: Plan, source: Source, compile_min: int = COMPILE_MIN) -> None:
        super().__init__(plan, source)
        self.compile_min = compile_min
        self.compiled = CompiledEngine(plan, source, quiet=True)
        self.native = NativeEngine(plan, source, quiet=True, foreach=self.foreach)

    def reset(self) -> None:
        super().reset()
        self.compiled.reset()
        self.native.reset()

    def run_bucket(self, group: dict[str, Any], live: Live, keep: Any, items: list[_Item], step: Tensor,
                   grad_scale: Tensor | None) -> None:
        # On the CPU only what computes what the reference engine computes: the native loop (as fast as
        # torch's fused kernels, Adam's faster), which runs the rest on foreach. torch's CPU kernels compute
        # in another order, in float32 for half-precision tensors, and fused SGD leaves half-precision weights
        # unchanged in torch 2.13; fused=True still runs them.
        if items[0].param.device.type == "cpu":
            self.last = self.fallback(items)
            self.last.run_bucket(group, live, keep, items, step, grad_scale)
        else:
            super().run_bucket(group, live, keep, items, step, grad_scale)

    def native_runner(self, items: list[_Item]) -> NativeEngine | None:
        return self.native.native_runner(items) if self.last is self.native else None

    def fallback(self, items: list[_Item]) -> BucketEngine:
        """The native loop on the CPU (it runs what it cannot on foreach); the compiled step for one
        large flat buffer elsewhere (or without a C compiler); else foreach."""
        if items[0].param.device.type == "cpu" and not self.native.broken:
            return self.native
        flat = len(items) == 1 and not items[0].whole
        return self.compiled if flat and items[0].param.numel() >= self.compile_min else self.foreach

    def project(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if self.last is self:
            super().project(group, params)
        else:
            self.last.project(group, params)


def make_engine(name: str, plan: Plan, source: Source) -> Engine:
    """The engine called ``name`` running ``plan`` over ``source``'s parameters (see the module docstring)."""
    engines: dict[str, Callable[[Plan, Source], Engine]] = {
        "auto": AutoEngine, "reference": ReferenceEngine, "foreach": ForeachEngine, "compiled": CompiledEngine,
        "fused": FusedEngine, "native": NativeEngine}
    if name not in engines:
        raise ValueError(f"engine must be one of {', '.join(engines)}; got {name!r}")
    return engines[name](plan, source)
