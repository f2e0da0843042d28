"""A chain of rules as a ``torch.optim.Optimizer``: what a step computes, separate from how it runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from descend.optim._flat import FlatLayout
from descend.optim.engines import ENGINES as ENGINE_CLASSES
from descend.optim.engines import KernelRun, Plan, make_engine
from descend.optim.engines.plan import check_state, traced_plans
from descend.optim.engines.store import PARAM_ROUNDINGS, resolve_state_dtype, state_family, store_for
from descend.optim.rules.base import Rule, WeightRule, step_dtype
from descend.optim.rules.descent import ScaleByLR

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

#: The engines that run every chain; ``"fused"`` (torch's kernels) runs only torch's chains.
ENGINES = tuple(name for name in ENGINE_CLASSES if name != "fused")


def _normalise(rules: Sequence[Rule]) -> tuple[list[Rule], list[WeightRule], list[WeightRule]]:
    """Sort a chain into update rules, weight scalings (decay) and projections; place ``scale_by_lr``."""
    transforms: list[Rule] = []
    decays: list[WeightRule] = []
    projections: list[WeightRule] = []
    for rule in rules:
        if not isinstance(rule, Rule):
            raise TypeError(f"chain takes descend.optim rules (e.g. optim.ema(0.9)), got {rule!r}")
        if isinstance(rule, WeightRule):
            if rule.scales_weights:
                decays.append(rule)
            if rule.projects:
                projections.append(rule)
        else:
            transforms.append(rule)
    lr_rules = [i for i, r in enumerate(transforms) if r.lr_step]
    if not lr_rules:
        transforms.append(ScaleByLR())
    elif len(lr_rules) > 1:
        raise ValueError("a chain takes scale_by_lr at most once")
    for i, rule in enumerate(transforms):
        if rule.global_norm and i != 0:
            raise ValueError(f"{rule.name} must be the first rule of a chain (it scales the gradient)")
    return transforms, decays, projections


def torch_engine_flags(engine: str, foreach: bool | None, fused: bool | None, capturable: bool,
                       differentiable: bool) -> str:
    """The engine that honours torch's ``foreach``/``fused``/``capturable``/``differentiable`` arguments
    (their meaning: :class:`ChainOptimizer`)."""
    if capturable:
        raise ValueError("capturable=True (CUDA graph capture) is not supported: descend reads each step count "
                         "on the host. Use torch.optim with capturable=True, or leave capturable at False")
    if differentiable:
        raise ValueError("differentiable=True is not supported: descend steps run under torch.no_grad(). "
                         "Use torch.optim with differentiable=True to differentiate through a step")
    if foreach and fused:
        raise ValueError("foreach=True and fused=True cannot be set together; pick one (or engine=...)")
    wanted = ("fused" if fused else "foreach" if foreach else "reference" if foreach is False
              else "foreach" if fused is False else None)
    if wanted is None:
        return engine
    if engine not in ("auto", wanted):
        raise ValueError(f"engine={engine!r} conflicts with torch's foreach={foreach!r}, fused={fused!r} "
                         f"(engine {wanted!r}); pass only one of them")
    return wanted


def _assign_keys(rules: Sequence[Rule]) -> dict[str, Any]:
    """Give every rule's hyperparameters and states unique keys; return the group defaults."""
    defaults: dict[str, Any] = {}
    state_taken: set[str] = {"step"}
    for rule in rules:
        for name, value in rule.hyper.items():
            key = name if name not in defaults else f"{rule.name}.{name}"
            n = 2
            while key in defaults:
                key, n = f"{rule.name}{n}.{name}", n + 1
            rule.keys[name] = key
            defaults[key] = value
        for name in rule.all_state_keys():
            key = name if name not in state_taken else f"{rule.name}.{name}"
            n = 2
            while key in state_taken:
                key, n = f"{rule.name}{n}.{name}", n + 1
            rule.state_names[name] = key
            state_taken.add(key)
    return defaults


def _differ(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values differ: numbers by value, tensors by identity."""
    return a is not b and (torch.is_tensor(a) or torch.is_tensor(b) or a != b)


def momentum_rule(rules: Sequence[Rule]) -> Rule | None:
    """The rule whose momentum coefficient the group key ``momentum`` stands for, or None.

    torch's schedulers that cycle momentum (``OneCycleLR``, ``CyclicLR``) write ``momentum``, or
    ``betas[0]`` where a group has ``betas``. A chain with neither key of its own gets a key ``momentum``
    for its first rule with a :attr:`~descend.optim.rules.base.Rule.momentum_name` (``ema``'s ``beta``).
    """
    if any(key in ("momentum", "betas") for rule in rules for key in rule.keys.values()):
        return None
    return next((rule for rule in rules if rule.momentum_name is not None), None)


class ChainOptimizer(torch.optim.Optimizer):
    """An optimizer that runs a chain of rules (the step: :mod:`descend.optim.rules`).

    Speaks the ``torch.optim.Optimizer`` contract: param groups (every rule hyperparameter is a
    group key, so it can differ per group and be scheduled), ``step(closure)``, ``zero_grad``,
    ``state_dict``/``load_state_dict`` (state keys named as torch names them), LR schedulers.

    Args:
        params: parameters or param-group dicts.
        rules: the chain (see :mod:`descend.optim`); ``scale_by_lr`` is appended if absent.
        lr: learning rate (group key ``lr``).
        maximize: ascend instead of descend (``g <- -g``).
        engine: how steps execute; every engine computes what ``"reference"`` computes: ``"auto"``
            (default), ``"reference"``, ``"foreach"``, ``"native"``, ``"compiled"`` or ``"fused"`` (torch's
            kernels; only for torch's chains). What each does and when ``auto`` picks it:
            ``docs/guide/engines.md`` (:mod:`descend.optim.engines`); which one stepped what in the last
            step: :attr:`last_step_kernels`.
        state_dtype: how the optimizer state is kept (default: in the parameter's dtype): a floating
            dtype (a ``torch.dtype`` or its name), e.g. ``torch.bfloat16`` to halve the state memory,
            updated in float32 and stored with stochastic rounding; or ``"int8"``: 8-bit blockwise state,
            1 byte per value plus a float32 scale per 256 values (AdamW: 2.03 bytes of state per
            parameter instead of 8), rounded stochastically (:mod:`descend.optim.engines.store`).
            ``state_dict()`` then holds each state's uint8 codes and, under ``<key>_scales``, its block
            scales; ``load_state_dict`` converts a state saved in another ``state_dtype``.
        param_rounding: how a bfloat16 parameter's new value is rounded. ``"stochastic"`` (default): the
            chain and ``w <- weight_factor*w + u`` are computed in float32 and the result rounded
            stochastically to bfloat16 (unbiased, so updates below half a bf16 ulp survive on average:
            pure-bfloat16 training without a float32 copy of the weights); the rules run in float32,
            and state kept in the parameter's dtype (``state_dtype=None``) is stored rounded
            stochastically as well. ``"nearest"``: torch.optim's bfloat16 arithmetic, rounding to
            nearest. Other dtypes are stepped as torch steps them either way.
        flat: keep each param group's parameters, gradients and state as views of one flat buffer each
            (per device and dtype), stepped as one tensor (:mod:`descend.optim._flat`). ``zero_grad``
            keeps the gradient views, as ``zero_grad(set_to_none=False)``. Create the optimizer after
            moving the model to its device. Sharded, non-contiguous and frozen parameters stay as they are.
        foreach, fused, capturable, differentiable: torch's arguments, so torch-style code runs
            unchanged: ``foreach=True`` is ``engine="foreach"``, ``foreach=False`` the reference
            engine, ``fused=True`` ``engine="fused"``, ``fused=False`` the foreach engine; ``None``
            keeps ``engine``. ``capturable=True`` and ``differentiable=True`` raise (not supported).
        **hyper: overrides of rule hyperparameters by group key (e.g. ``beta=0.95``).

    A chain whose momentum is an ``ema`` also has the group key ``momentum`` for its ``beta``
    (:func:`momentum_rule`), so torch's ``OneCycleLR`` and ``CyclicLR`` cycle it (:meth:`follow_momentum`).
    """

    def __init__(self, params: ParamsT, rules: Sequence[Rule], *, lr: float = 1e-3, maximize: bool = False,
                 engine: str = "auto", state_dtype: torch.dtype | str | None = None, flat: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, param_rounding: str = "stochastic", **hyper: Any) -> None:
        engine = torch_engine_flags(engine, foreach, fused, capturable, differentiable)
        if engine not in (*ENGINES, "fused"):
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, fused; got {engine!r}")
        state_dtype = resolve_state_dtype(state_dtype)
        if flat is True and store_for(state_dtype).granule > 1:
            raise ValueError(f"flat=True does not take state_dtype={state_dtype!r} (its blocks would span "
                             "parameters); use flat=False")
        if param_rounding not in PARAM_ROUNDINGS:
            raise ValueError(f"param_rounding must be one of {', '.join(map(repr, PARAM_ROUNDINGS))}, "
                             f"got {param_rounding!r}")
        self.rules, self.decays, self.projections = _normalise(rules)
        defaults = {"lr": lr, "maximize": maximize, **_assign_keys(self.all_rules)}
        unknown = sorted(set(hyper) - set(defaults))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown} for this chain; "
                             f"valid names: {sorted(defaults)}")
        defaults.update(hyper)
        self.momentum_rule = momentum_rule(self.all_rules)
        self._momentum_seen: list[Any] = []  # per param group, the value of momentum last synced
        if self.momentum_rule is not None:
            defaults["momentum"] = defaults[self.momentum_key]
        if not isinstance(flat, bool):
            raise ValueError(f"flat must be True or False, got {flat!r}")
        self.engine = engine
        self.state_dtype = state_dtype
        self.param_rounding = param_rounding
        self.flat = flat
        self.flat_layout: FlatLayout | None = FlatLayout() if flat else None
        super().__init__(params, defaults)
        self._engine = make_engine(engine, self.plan(), self)
        self._reference = make_engine("reference", self.plan(), self)

    def plan(self) -> Plan:
        """What the engine runs: the chain's rules, its weight rules, the state dtype and the flat layout."""
        return Plan(tuple(self.rules), tuple(self.decays), tuple(self.projections), self.state_dtype, self.flat_layout,
                    self.param_rounding)

    @property
    def last_step_kernels(self) -> tuple[KernelRun, ...]:
        """Which kernel stepped each bucket in the last step, in the order they ran (read-only).

        Each entry names the param group (its index), the engine whose kernel ran (``"reference"``,
        ``"foreach"``, ``"compiled"``, ``"native"`` or ``"fused"``) and how many tensors it stepped (a
        flat buffer counts as one). A parameter's first step, which creates its state, is always a
        ``"reference"`` entry. Empty before the first step; a step traced by ``torch.compile`` leaves it
        as the last eager step left it. See ``docs/guide/engines.md``.
        """
        return tuple(self._engine.report)

    @property
    def weight_rules(self) -> list[WeightRule]:
        """The rules that act on the weights (decays, then projections), each once."""
        return [*self.decays, *(r for r in self.projections if r not in self.decays)]

    @property
    def all_rules(self) -> list[Rule]:
        """Update rules, then weight rules, in the order they act."""
        return [*self.rules, *self.weight_rules]

    @property
    def momentum_key(self) -> str:
        """The group key that ``momentum`` stands for (e.g. ``beta``); only where :attr:`momentum_rule` is set."""
        assert self.momentum_rule is not None and self.momentum_rule.momentum_name is not None
        return self.momentum_rule.keys[self.momentum_rule.momentum_name]

    def synced_momentum(self) -> list[Any]:
        """Per group, the value of the key ``momentum`` stands for, taken as the last synced (loaded, unpickled)."""
        if self.momentum_rule is None:
            return []
        return [group.get(self.momentum_key) for group in self.param_groups]

    def follow_momentum(self) -> None:
        """Make ``momentum`` and the key it stands for agree, taking the one written since the last step.

        A value written to ``momentum`` (a scheduler) moves into the rule's key and is validated; a value
        written to the rule's key (or to both: the rule key wins) is copied to ``momentum``. Numbers
        compare by value, tensors by identity (a tensor changed in place is the same hyperparameter).
        """
        key = self.momentum_key
        seen = self._momentum_seen
        for i, group in enumerate(self.param_groups):
            own = group[key]
            momentum = group.get("momentum", own)
            if _differ(momentum, own):
                if not _differ(own, seen[i] if i < len(seen) else own):
                    group[key] = momentum
                    rule = self.momentum_rule
                    assert rule is not None
                    rule.validate(rule.read(group))
                else:
                    group["momentum"] = own
            elif "momentum" not in group:
                group["momentum"] = own
            if i < len(seen):
                seen[i] = group[key]
            else:
                seen.append(group[key])

    # -- the contract ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = set(param_group) if isinstance(param_group, dict) else set()
        given_momentum = "momentum" in given
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self.momentum_rule is not None:
            key = self.momentum_key
            if given_momentum and key in given and _differ(group[key], group["momentum"]):
                raise ValueError(f"a param group sets momentum={group['momentum']!r} and {key}="
                                 f"{group[key]!r}, which name one hyperparameter here; set one of them")
            if given_momentum:
                group[key] = group["momentum"]
            else:
                group["momentum"] = group[key]
            del self._momentum_seen[len(self.param_groups) - 1:]
            self._momentum_seen.append(group[key])
        if not isinstance(group["maximize"], bool):
            raise ValueError(f"maximize must be a bool, got {group['maximize']!r}")
        for rule in self.all_rules:
            rule.validate(rule.read(group))
        if self.flat_layout is not None:
            self.flat_layout.add_group(group["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients: to None (``set_to_none``, torch's default) or to zero.

        With ``flat=True`` the gradients of flat parameters stay views of their zeroed buffer (one
        fill per buffer); a flat parameter that no longer requires grad gets None.
        """
        if self.flat_layout is None:
            super().zero_grad(set_to_none)
            return
        self.flat_layout.zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.flat_layout.position(p) is not None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,  # type: ignore[override]
             grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> Any:
        """Take one step: run the chain on every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled).
            grad_scale: a loss scale to divide the gradients by inside the step (``.grad`` is left as it
                is); read from the attribute ``grad_scale`` when absent (the protocol of torch's fused
                optimizers).
            found_inf: nonzero when a scaled gradient overflowed; the whole step is then skipped
                (parameters, state and step counts unchanged). Read from the attribute ``found_inf``
                when absent.

        ``torch.amp.GradScaler`` treats a descend optimizer as torch's non-fused ones: it unscales
        ``.grad`` itself (so gradient clipping between ``scaler.unscale_`` and ``scaler.step`` sees true
        gradients, as Lightning's does) and skips ``step`` when a gradient overflowed. The optimizer does
        not set ``_step_supports_amp_scaling``: unscaling inside the step would send every bucket to the
        foreach engine (neither the native loop nor torch's fused kernels take a scale here).

        Traced by ``torch.compile`` (``torch.compile(opt.step)``), the step runs the reference loop with
        the step count as a tensor, which the compiler fuses; hyperparameters that change between
        steps (a scheduler) become inputs of the compiled graph after one recompile, or none where
        they are tensors changed in place (``lr=torch.tensor(1e-3)``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.sum() != 0):
            return loss
        if grad_scale is not None and not torch.is_tensor(grad_scale):
            grad_scale = torch.tensor(float(grad_scale))
        if self.momentum_rule is not None:  # traced, outside the graph: comparing the values would specialise it
            (torch.compiler.disable(self.follow_momentum) if torch.compiler.is_compiling() else self.follow_momentum)()
        if torch.compiler.is_compiling():  # every engine computes what the reference loop does, which traces
            self._reference.step_groups(traced_plans(self._reference.plan, self.param_groups, grad_scale), grad_scale)
        else:
            self._engine.step(grad_scale)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state (also a ``torch.optim`` state_dict of the same rule); missing keys take defaults.

        Raises ``RuntimeError`` (and keeps the state it had) when a state tensor does not fit its
        parameter: another shape (a checkpoint of a resized layer), dtype or device.
        """
        state_dtype = self.state_dtype
        store = store_for(state_dtype)
        before = {"state": self.state, "param_groups": self.param_groups}
        super().load_state_dict(state_dict)
        signed = {rule.state_names.get(n, n): n not in rule.nonnegative_state
                  for rule in self.rules for n in rule.all_state_keys()}
        keys = list(signed)
        # the saved state of each parameter, by position as torch maps it
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        saved_of = {id(p): state_dict["state"].get(i, {}) for i, p in zip(saved_ids, params)}
        try:
            for group, saved in zip(self.param_groups, state_dict["param_groups"]):
                if self.momentum_rule is not None and "momentum" not in saved:  # a state_dict without the key
                    group["momentum"] = group.get(self.momentum_key, self.defaults[self.momentum_key])
                for key, value in self.defaults.items():
                    group.setdefault(key, value)
                for p in group["params"]:
                    state = self.state.get(p)
                    if not state:
                        continue
                    # torch before 1.12 saved "step" as a Python number, fused and capturable torch optimizers
                    # keep it on the parameter's device: descend counts on the host, in torch's step dtype
                    step = state.get("step")
                    if step is not None and not (torch.is_tensor(step) and step.dim() == 0 and step.is_cpu
                                                 and step.is_floating_point()):
                        state["step"] = torch.tensor(float(step), dtype=step_dtype())
                    # torch casts loaded state to the parameter dtype, which may lose range (bfloat16 state through
                    # a float16 parameter) or turn 8-bit codes into numbers: convert what was saved instead
                    saved = saved_of.get(id(p), {})
                    for key, sign in signed.items():
                        converted = store.convert(saved, key, sign, p)
                        if converted is not None:
                            for old in state_family(key):
                                state.pop(old, None)
                            state.update(converted)
                    if isinstance(state_dtype, torch.dtype):  # the state of no rule of this chain, as saved
                        for key, value in state.items():
                            if (key != "step" and key not in signed and torch.is_tensor(value)
                                    and value.is_floating_point()):
                                original = saved.get(key, value)
                                state[key] = original.to(device=value.device, dtype=state_dtype, copy=True)
                    check_state(p, state, keys, state_dtype)
        except RuntimeError:
            self.__dict__.update(before)
            raise
        self._momentum_seen = self.synced_momentum()
        self._engine.reset()

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; a chain also needs its rules.
        state = super().__getstate__()
        state.update(rules=self.rules, decays=self.decays, projections=self.projections, engine=self.engine,
                     state_dtype=self.state_dtype, flat=self.flat, param_rounding=self.param_rounding)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's __setstate__ (also run by load_state_dict) adds "differentiable" to the defaults, whence
        # load_state_dict would spread it to every group: a chain has no such key
        defaults = state.get("defaults", self.__dict__.get("defaults"))
        foreign = defaults is not None and "differentiable" not in defaults
        super().__setstate__(state)
        if foreign:
            self.defaults.pop("differentiable", None)
        if "_engine" in self.__dict__:  # load_state_dict goes through here too: keep the engine (and its settings)
            return
        self.momentum_rule = momentum_rule(self.all_rules)
        self._momentum_seen = self.synced_momentum()
        self.flat = state.get("flat", False)
        self.param_rounding = state.get("param_rounding", "nearest")  # pickled before it existed: torch's rounding
        self.flat_layout = None
        if self.flat:  # a copy (pickle, deepcopy) lays out its own parameters anew
            self.flat_layout = FlatLayout()
            for group in self.param_groups:
                self.flat_layout.add_group(group["params"])

        self._engine = make_engine(self.engine, self.plan(), self)
        self._reference = make_engine("reference", self.plan(), self)

    def __repr__(self) -> str:
        chain = " -> ".join(rule.name for rule in self.all_rules)
        return f"{type(self).__name__}({chain}; engine={self.engine}, groups={len(self.param_groups)})"


def chain(params: ParamsT, *rules: Rule, lr: float = 1e-3, maximize: bool = False, engine: str = "auto",
          state_dtype: torch.dtype | str | None = None, flat: bool = False, foreach: bool | None = None,
          fused: bool | None = None, param_rounding: str = "stochastic", **hyper: Any) -> ChainOptimizer:
    """Compose rules into an optimizer (the step: :mod:`descend.optim`), e.g. Signum with decoupled decay::

        opt = chain(model.parameters(), ema(0.9), sign(), decoupled_decay(0.1), lr=1e-3)

    ``scale_by_lr`` is appended unless the chain places it; decoupled decay acts on the weights wherever
    it stands. See :class:`ChainOptimizer`.
    """
    return ChainOptimizer(params, rules, lr=lr, maximize=maximize, engine=engine, state_dtype=state_dtype,
                          flat=flat, foreach=foreach, fused=fused, param_rounding=param_rounding, **hyper)
