"""``engine="reference"``: the readable loop, one parameter at a time; the oracle every other engine equals."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from descend.optim.engines.plan import (
    ActiveRules,
    Engine,
    GroupPlan,
    KernelRun,
    Plan,
    Source,
    check_grad,
    check_state,
    group_plans,
    rule_state,
    scales_weights,
    state_keys,
    state_layout,
    traced_scalars,
    with_scalars,
)
from descend.optim.engines.shards import DTensor, local
from descend.optim.engines.store import NoisePositions, param_seeds, param_store
from descend.optim.rules.base import step_dtype


class ReferenceEngine(Engine):
    """Per parameter: ``u <- g`` (``-g`` when maximising, divided by ``grad_scale`` if given), each active
    rule in turn on its state (loaded and stored by the plan's store), ``w <- weight_factor*w + u``, then
    the projections. Hyperparameters are Python numbers (or the tensors the user set).

    A bfloat16 parameter under ``param_rounding="stochastic"`` (:meth:`Plan.rounds_params`): ``u`` and the
    ``w`` the rules see in float32 (:meth:`Plan.update_dtype`), ``factor*w + u`` in float32, stored in
    ``w`` rounded stochastically (:func:`~descend.optim.engines.store.param_store`)."""

    name = "reference"

    def __init__(self, plan: Plan, source: Source) -> None:
        super().__init__(plan, source)
        self.noise_position = NoisePositions(source, plan.layout)

    def step(self, grad_scale: Tensor | None = None) -> None:
        self.report = []
        for index, (group, active, factor) in enumerate(group_plans(self.plan, self.source.param_groups, grad_scale)):
            count = self.step_groups([(group, active, factor)], grad_scale)
            if count:
                self.report.append(KernelRun(index, "reference", count))

    def step_groups(self, plans: Iterable[GroupPlan], grad_scale: Tensor | None = None) -> int:
        """Step every parameter with a gradient, per group as ``plans`` (:func:`group_plans`) give it; returns
        how many it stepped."""
        count = 0
        for group, active, factor in plans:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group, active, factor, grad_scale)
                    count += 1
        return count

    def step_param(self, p: Tensor, group: dict[str, Any], active: ActiveRules, factor: Any = 1,
                   grad_scale: Tensor | None = None) -> None:
        """One step of one parameter (also the first step of every parameter under the other engines)."""
        plan = self.plan
        store = plan.store_of(p.dtype)
        g = check_grad(p)
        # a 0-d parameter steps as a 1-element tensor: torch computes two 0-d operands (the parameter and a
        # 0-d tensor hyperparameter or grad scale) in the wider dtype, a 1-element tensor in its own; a sharded
        # one steps its local shard (the rules are elementwise), its state as well
        view = local if isinstance(p, DTensor) else torch.atleast_1d
        w, g = view(p), view(g)
        u = g / grad_scale.to(g.device) if grad_scale is not None else g
        u = -u if group["maximize"] else u
        state = self.source.state[p]
        check_state(p, state, state_keys(active), plan.state_dtype)
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=step_dtype())
        state["step"] += 1
        # traced by torch.compile the count stays a tensor (float64: as exact as the number), which the graph
        # reads instead of specialising on each value
        step = state["step"].double() if torch.compiler.is_compiling() else int(state["step"].item())
        rounded = plan.rounds_params(p.dtype)
        ordinal, offset = self.noise_position(p) if store.stochastic or rounded else (0, 0)
        layout = state_layout(active)
        seeds = store.seeds(state["step"], [ordinal], layout, p.device)
        work_dtype = plan.update_dtype(p.dtype)
        if work_dtype is not None:  # the chain in float32, on a float32 copy of the weights
            u, w = u.to(work_dtype), w.to(work_dtype)
        scaled = with_scalars(active, step) if isinstance(step, int) else traced_scalars(active, step)
        for r, (rule, hp) in enumerate(scaled):
            stored, fresh = rule_state(rule, state, p, hp, store)
            if w is not p:
                stored = {k: store.map(v, view) for k, v in stored.items()}
            work = {k: store.load(v) for k, v in stored.items()}
            u = (rule.first_update if fresh else rule.update)(u, w, work, hp, step)
            for j, (k, v) in enumerate(stored.items()):
                if work[k] is not v:
                    store.store_(v, work[k], seeds[r][j][0] if seeds else 0, offset)
        new = w.float() if rounded and w.dtype != torch.float32 else w  # a float32 w of a rounded p is a copy
        if scales_weights(factor):  # decoupled decay: w <- factor*w + u
            new.mul_(factor)
        new.add_(u)
        if rounded:
            w = view(p)
            param_store().store_(w, new, param_seeds(state["step"], [ordinal], p.device)[0], offset)
        for projection in plan.projections:  # a ball's norm is the whole tensor's: a DTensor reduces its shards
            projection.project_(p if view is local else w, projection.read(group))
