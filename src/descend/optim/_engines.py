"""How a chain's step executes. Every engine runs the same rule code (:mod:`descend.optim._rules`).

- :class:`ReferenceEngine`: one parameter at a time, Python numbers for hyperparameters. Readable,
  and the oracle the others are tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from descend.optim._rules import ClipByGlobalNorm, Rule

if TYPE_CHECKING:
    from descend.optim._chain import ChainOptimizer


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


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim uses for the ``step`` counter."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def clip_coefficients(opt: ChainOptimizer) -> list[Any] | None:
    """Per group, ``min(1, max_norm / (||g||_2 + 1e-6))`` with the norm over all gradients, or None."""
    if not opt.rules or not isinstance(opt.rules[0], ClipByGlobalNorm):
        return None
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    total = torch.nn.utils.get_total_norm(grads, foreach=False)
    key = opt.rules[0].keys["max_grad_norm"]
    return [torch.clamp(group[key] / (total + 1e-6), max=1.0) for group in opt.param_groups]


def weight_keep(opt: ChainOptimizer, group: dict[str, Any]) -> Any:
    """The factor decoupled decay multiplies the weights by this step (1 without decay)."""
    keep: Any = 1
    for rule in opt.decays:
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


class Engine:
    """Runs an optimizer's chain over its parameters."""

    name = "engine"

    def __init__(self, opt: ChainOptimizer) -> None:
        self.opt = opt

    def step(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget anything derived from the optimizer's state (called after ``load_state_dict``)."""


class ReferenceEngine(Engine):
    """The readable loop: per parameter ``u <- g``, each active rule in turn, ``w <- keep*w + u``."""

    name = "reference"

    def step(self) -> None:
        opt = self.opt
        clip = clip_coefficients(opt)
        for gi, group in enumerate(opt.param_groups):
            hps = [rule.read(group) for rule in opt.rules]
            if clip is not None:
                hps[0]["clip_coef"] = clip[gi]
            live = [(rule, hp) for rule, hp in zip(opt.rules, hps) if rule.active(hp)]
            keep = weight_keep(opt, group)
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group, live, keep)

    def step_param(self, p: Tensor, group: dict[str, Any], live: list[tuple[Rule, dict[str, Any]]],
                   keep: Any) -> None:
        opt = self.opt
        g = check_grad(p)
        u = -g if group["maximize"] else g
        state = opt.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        state["step"] += 1
        step = int(state["step"].item())
        for rule, hp in live:
            view, fresh = rule_state(rule, state, p, hp, opt.state_dtype)
            u = (rule.first_update if fresh else rule.update)(u, p, view, hp, step)
        if keep != 1:
            p.mul_(keep)
        p.add_(u)
        for projection in opt.projections:
            projection.project_(p, projection.read(group))


def make_engine(opt: ChainOptimizer, name: str) -> Engine:
    """The engine called ``name`` (``"auto"`` picks the fastest available) for ``opt``."""
    if name in ("auto", "reference", "foreach", "compiled"):
        return ReferenceEngine(opt)
    raise ValueError(f"unknown engine {name!r}")
