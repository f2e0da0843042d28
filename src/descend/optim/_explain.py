"""Describing a chain: its equations (:func:`explain`) and the weight bound it implies (:func:`constraint_state`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from descend.optim._chain import ChainOptimizer
from descend.optim.rules.base import Rule


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_format_value(v) for v in value) + ")"
    return repr(value)


def explain(opt: torch.optim.Optimizer) -> str:
    """The update equations a descend optimizer runs, step by step, with the values of group 0.

    Groups whose hyperparameters differ from group 0 are listed after the equations.
    """
    if not isinstance(opt, ChainOptimizer):
        raise TypeError(f"explain takes a descend optimizer, got {type(opt).__name__}")
    group0 = opt.param_groups[0]
    lines = [f"{type(opt).__name__}  (engine: {opt.engine}; {len(opt.param_groups)} param group(s))"]
    lines.append("  g ← −∇L(w)  (maximize)" if group0["maximize"] else "  g ← ∇L(w)")
    lines.append("  u ← g")

    def line(head: str, rule: Rule) -> str:
        hp = ", ".join(f"{key}={_format_value(group0[key])}" for key in rule.keys.values())
        off = "" if rule.active(rule.read(group0)) else "    (off at these values: skipped)"
        return f"  {head} {rule.equation()}" + (f"    [{hp}]" if hp else "") + off

    lines += [line(f"{i}. {rule.name:<20}", rule) for i, rule in enumerate(opt.rules, start=1)]
    lines += [line(f"then {rule.name:<17}", rule) for rule in opt.decays]
    lines.append("  w ← w + u")
    lines += [line(f"then {rule.name:<17}", rule) for rule in opt.projections]
    state = [rule.state_names.get(key, key) for rule in opt.rules if rule.active(rule.read(group0))
             for key in rule.state_keys(rule.read(group0))]
    lines.append(f"  state per parameter: step{''.join(', ' + k for k in state)}")
    keys = [k for k in opt.defaults if k in group0]
    for j, group in enumerate(opt.param_groups[1:], start=1):
        diff = {k: group[k] for k in keys if group[k] != group0[k]}
        if diff:
            lines.append(f"  group {j}: " + ", ".join(f"{k}={_format_value(v)}" for k, v in diff.items()))
    return "\n".join(lines)


def implied_radius(opt: ChainOptimizer, group: dict[str, Any]) -> float | None:
    """The ``||w||_inf`` bound a group's chain implies, or ``None``.

    A projection onto a box of radius ``r`` gives ``r``. Decoupled decay ``lambda`` after a rule whose
    output is bounded by 1 per coordinate (sign, softsign, Lion) gives ``1/lambda``: at
    ``|w| > 1/lambda`` the decay term ``lambda*|w|`` outweighs any update, so ``|w|`` shrinks.
    Each weight rule answers through :meth:`WeightRule.radius <descend.optim.rules.base.WeightRule.radius>`.
    """
    bounded = False  # is the update direction bounded by 1 per coordinate?
    for rule in opt.rules:
        bounded = rule.bounded or (bounded and rule.keeps_bound)
    lr = float(group["lr"])
    radii = [r for rule in opt.weight_rules if (r := rule.radius(rule.read(group), lr, bounded)) is not None]
    return min(radii) if radii else None


def constraint_state(opt: torch.optim.Optimizer) -> list[dict[str, float | None]]:
    """Per param group: the constraint radius and where the weights stand against it.

    Keys: ``radius`` (``1/lambda`` for decoupled decay on sign methods, or the box radius; ``None``
    when the chain implies no bound), ``max_abs_weight`` (``max|w|``), ``max_abs_weight_over_radius``
    (``max|w| / radius``, which equals ``max|w| * lambda`` for decoupled decay) and
    ``fraction_at_bound`` (share of weights with ``|w| >= radius - lr``).
    """
    if not isinstance(opt, ChainOptimizer):
        raise TypeError(f"constraint_state takes a descend optimizer, got {type(opt).__name__}")
    out: list[dict[str, float | None]] = []
    for group in opt.param_groups:
        params = [p.detach() for p in group["params"] if p.numel()]
        max_abs = max((float(p.abs().max()) for p in params), default=0.0)
        radius = implied_radius(opt, group)
        entry: dict[str, float | None] = {"radius": radius, "max_abs_weight": max_abs,
                                          "max_abs_weight_over_radius": None, "fraction_at_bound": None}
        if radius is not None and math.isfinite(radius):
            total = sum(p.numel() for p in params)
            tol = float(group["lr"])
            at = sum(int((p.abs() >= radius - tol).sum()) for p in params)
            entry["max_abs_weight_over_radius"] = max_abs / radius
            entry["fraction_at_bound"] = at / total if total else 0.0
        out.append(entry)
    return out
