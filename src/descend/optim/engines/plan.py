"""What an engine runs: the :class:`Plan` of a chain, and per param group and step (:func:`group_plans`) the
rules its hyperparameters do not switch off (:data:`ActiveRules`), the weight factor and the clipping factor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from descend.optim._flat import FlatLayout
from descend.optim.engines.shards import DTensor
from descend.optim.engines.store import Store, rounds_params, store_for
from descend.optim.rules.base import Rule, WeightRule

#: A param group's active rules, each with its hyperparameters (by the rule's own names) this step.
ActiveRules = list[tuple[Rule, dict[str, Any]]]
#: Per param group: the group, its active rules and its weight factor.
GroupPlan = tuple[dict[str, Any], ActiveRules, Any]


@dataclass(frozen=True)
class Plan:
    """What an engine runs, built by the optimizer from its chain.

    Attributes:
        rules: the update rules in order (``scale_by_lr`` included).
        decays: weight rules folded into ``w <- weight_factor * w + u`` (:attr:`WeightRule.scales_weights`).
        projections: weight rules applied to ``w`` after the step (:attr:`WeightRule.projects`).
        state_dtype: dtype of the optimizer state (None: the parameter's; ``"int8"``: 8-bit blocks).
        layout: the flat buffers (``flat=True``), or None.
        param_rounding: how a new bfloat16 parameter value is rounded: ``"stochastic"`` (computed in float32,
            rounded with the hash noise of :mod:`~descend.optim.engines.store`) or ``"nearest"`` (torch's
            bfloat16 arithmetic).
    """

    rules: tuple[Rule, ...]
    decays: tuple[WeightRule, ...] = ()
    projections: tuple[WeightRule, ...] = ()
    state_dtype: torch.dtype | str | None = None
    layout: FlatLayout | None = None
    param_rounding: str = "stochastic"

    def store_of(self, dtype: torch.dtype) -> Store:
        """How the state of parameters of ``dtype`` is loaded for the rules and stored back
        (:mod:`~descend.optim.engines.store`): the ``state_dtype``'s store; with ``state_dtype=None`` (the
        parameter's dtype), a parameter rounded stochastically (:meth:`rounds_params`) keeps its state in
        bfloat16 rounded stochastically too, updated in float32 as the parameter is."""
        if self.state_dtype is None and self.rounds_params(dtype):
            return store_for(torch.bfloat16)
        return store_for(self.state_dtype)

    def rounds_params(self, dtype: torch.dtype) -> bool:
        """Whether parameters of ``dtype`` are stepped in float32 and stored rounded stochastically."""
        return rounds_params(self.param_rounding, dtype)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype the chain computes the update in for parameters of ``dtype`` (None: the gradient's):
        float32 for a parameter whose new value is rounded stochastically (:meth:`rounds_params`)."""
        return torch.float32 if self.rounds_params(dtype) else None

    def describe(self) -> str:
        return " -> ".join(rule.name for rule in (*self.rules, *self.decays, *self.projections))


class Source(Protocol):
    """Where an engine finds what it steps: torch's ``param_groups`` and per-parameter ``state`` (an optimizer)."""

    param_groups: list[dict[str, Any]]
    state: Any


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


def check_state(p: Tensor, state: dict[str, Any], keys: Iterable[str], state_dtype: torch.dtype | str | None) -> None:
    """Raise ``RuntimeError`` unless each of ``state[key]`` (those present) fits ``p``: tensors on ``p``'s
    device of the shapes and dtypes the optimizer's store keeps (:meth:`Store.parts`: ``p``'s shape, in
    ``state_dtype``, else ``p``'s dtype; 8-bit state: uint8 codes and their block scales).

    Every engine checks this before it touches a state tensor: the native loop walks ``p.numel()``
    elements of each, so a state of another size would be read and written out of bounds.
    """
    store = store_for(state_dtype)
    for key in keys:
        if state.get(key) is None:
            continue
        for name, shape, dtype in store.parts(key, p):
            check_tensor(p, name, state.get(name), shape, dtype)


def check_tensor(p: Tensor, key: str, t: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """:func:`check_state` for one tensor ``t`` (``state[key]``) that should have ``shape`` and ``dtype``."""
    if not torch.is_tensor(t) or t.shape != shape or t.device != p.device or t.dtype != dtype:
        found = f"shape {tuple(t.shape)}, {t.dtype} on {t.device}" if torch.is_tensor(t) else f"a {type(t).__name__}"
        raise RuntimeError(
            f"optimizer state {key!r} ({found}) does not fit its parameter (shape {tuple(p.shape)}, {dtype} "
            f"on {p.device}{'' if shape == tuple(p.shape) else f'; expected shape {shape}'}): the state belongs "
            "to other parameters (a checkpoint of a resized model?); load a state_dict saved for these "
            "parameters, or drop this parameter's state (optimizer.state.pop(param))")


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


def weight_factor(plan: Plan, group: dict[str, Any]) -> Any:
    """The factor decoupled decay multiplies the weights by this step (1 without decay)."""
    factor: Any = 1
    for rule in plan.decays:
        hp = rule.read(group)
        if rule.active(hp):
            factor = factor * rule.weight_factor(hp, group["lr"])
    return factor


def scales_weights(factor: Any) -> bool:
    """Whether a weight factor changes the weights (a tensor, or a number other than 1)."""
    return not (isinstance(factor, (int, float)) and factor == 1)


def active_rules(plan: Plan, group: dict[str, Any], clip_coef: Any) -> ActiveRules:
    """The group's active rules with their hyperparameters (``clip_coef`` added for the clipping rule)."""
    hps = [rule.read(group) for rule in plan.rules]
    if clip_coef is not None:
        hps[0]["clip_coef"] = clip_coef
    return [(rule, hp) for rule, hp in zip(plan.rules, hps) if rule.active(hp)]


def group_plans(plan: Plan, groups: list[dict[str, Any]], grad_scale: Tensor | None) -> Iterator[GroupPlan]:
    """Per param group: the group, its active rules (with the clipping factor) and its weight factor.

    The global gradient norm for clipping is computed once, before the first group.
    """
    clip = clip_coefficients(plan, groups, grad_scale)
    for gi, group in enumerate(groups):
        yield group, active_rules(plan, group, None if clip is None else clip[gi]), weight_factor(plan, group)


def traced_plans(plan: Plan, groups: list[dict[str, Any]], grad_scale: Tensor | None) -> list[GroupPlan]:
    """:func:`group_plans` for a step that ``torch.compile`` traces, with every number a 0-d float64 tensor.

    The active rules' hyperparameters (static flags aside) and the weight factor (left at 1 without
    decay) become tensors computed in the graph (:func:`as_tensors` with ``traced=True``), so the
    Python numbers they come from stay inputs of the graph: a scheduler changing them between steps
    triggers one recompile (dynamo's automatic dynamic floats) the first time, none after.
    """
    out = []
    for group, active, factor in group_plans(plan, groups, grad_scale):
        active = [(rule, as_tensors(hp, rule.static, traced=True)) for rule, hp in active]
        if scales_weights(factor):
            factor = as_tensors({"factor": factor}, (), traced=True)["factor"]
        out.append((group, active, factor))
    return out


def with_scalars(active: ActiveRules, step: int | Tensor) -> ActiveRules:
    """The active rules with their per-step scalars (:meth:`Rule.scalars`) merged into their hyperparameters."""
    out: ActiveRules = []
    for rule, hp in active:
        extra = rule.scalars(hp, step)
        out.append((rule, {**hp, **extra} if extra else hp))
    return out


def traced_scalars(active: ActiveRules, step: Tensor) -> ActiveRules:
    """:func:`with_scalars` in a step that ``torch.compile`` traces, ``step`` a 0-d tensor.

    The per-step scalars are stacked into one tensor: inductor computes a stacked value once per step,
    where it would inline a 0-d expression (Adam's powers of the betas) into every vector iteration of
    each loop that reads it.
    """
    out = with_scalars(active, step)
    computed = [(i, key) for i, ((_, hp), (_, given)) in enumerate(zip(out, active)) for key in hp if key not in given]
    if computed:
        stacked = torch.stack([out[i][1][key] for i, key in computed])
        for j, (i, key) in enumerate(computed):
            out[i][1][key] = stacked[j]
    return out


def as_tensors(hp: dict[str, Any], static: tuple[str, ...], dtype: torch.dtype = torch.float64,
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


def state_layout(active: ActiveRules) -> tuple[tuple[str, ...], ...]:
    """Per active rule, the rule's names of its state tensors: the order of :attr:`Item.states`."""
    return tuple(tuple(rule.state_keys(hp)) for rule, hp in active)


def state_keys(active: ActiveRules) -> list[str]:
    """The optimizer state's keys of the active rules' state tensors, in the order of :func:`state_layout`."""
    return [rule.state_names.get(n, n) for (rule, _), names in zip(active, state_layout(active)) for n in names]


def state_signed(active: ActiveRules) -> list[bool]:
    """Per state tensor in the order of :func:`state_keys`, whether it may be negative
    (:attr:`Rule.nonnegative_state <descend.optim.rules.base.Rule.nonnegative_state>`)."""
    return [n not in rule.nonnegative_state for (rule, _), names in zip(active, state_layout(active)) for n in names]


def rule_state(rule: Rule, state: dict[str, Any], w: Tensor, hp: dict[str, Any],
               store: Store) -> tuple[dict[str, Any], bool]:
    """The rule's view of a parameter's state (by the rule's own names, as ``store`` loads it), created if
    missing; whether it was."""
    names = rule.state_keys(hp)
    fresh = any(rule.state_names.get(n, n) not in state for n in names)
    if fresh:
        for name, value in rule.init_state(w, hp, store.init_dtype).items():
            state.update(store.create(rule.state_names.get(name, name), value, name not in rule.nonnegative_state))
    return {n: store.stored(state, rule.state_names.get(n, n), n not in rule.nonnegative_state) for n in names}, fresh


@dataclass(frozen=True)
class KernelRun:
    """One entry of an optimizer's :attr:`~descend.optim.ChainOptimizer.last_step_kernels`."""

    group: int  # the index of the param group
    kernel: str  # the engine whose kernel stepped the tensors ("reference": one tensor at a time)
    tensors: int  # how many tensors it stepped (a flat buffer counts as one)


class Engine:
    """Runs an optimizer's chain over its parameters; ``report``: what stepped each bucket in the last
    step (:class:`KernelRun`), in the order they ran."""

    name = "engine"

    def __init__(self, plan: Plan, source: Source) -> None:
        self.plan = plan
        self.source = source
        self.report: list[KernelRun] = []

    def step(self, grad_scale: Tensor | None = None) -> None:
        """One step over every parameter with a gradient; gradients are divided by ``grad_scale`` if given."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget anything derived from the optimizer's state (called after ``load_state_dict``)."""
