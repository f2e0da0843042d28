"""``engine="compiled"``: the whole chain of a bucket traced by ``torch.compile`` into one fused pass.

Gradient unscaling, ``maximize``, the state's store (stochastic rounding included), the stochastic
rounding of bfloat16 parameters and projections are inside the pass; a store that ``torch.compile``
cannot trace (:attr:`~descend.optim.engines.store.Store.traceable`: 8-bit state) runs its buckets on
the foreach engine. Hyperparameters and the per-step scalars of :meth:`Rule.scalars
<descend.optim.rules.base.Rule.scalars>` enter as 0-d float64 tensors, so a scheduler triggers no
recompile; scalar expressions are evaluated in double precision and converted to the parameter's
dtype before they meet the elements. If compiling fails the engine runs the foreach engine instead.
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from descend.optim._flat import LANES
from descend.optim.engines.bucket import Bucket, BucketEngine, apply_projections
from descend.optim.engines.foreach import ForeachEngine
from descend.optim.engines.plan import KernelRun, Plan, Source, as_tensors, scales_weights, state_layout, with_scalars
from descend.optim.engines.store import Store, param_seeds, param_store
from descend.optim.rules.base import Rule, WeightRule

logger = logging.getLogger("descend.optim")

#: The ``torch.compile`` backend of compiled steps; the tests swap in an eager or counting one.
BACKEND: Any = "inductor"


def _static_key(value: Any) -> Any:
    """The part of a hyperparameter a compiled step specialises on: its value if static, else its kind."""
    if isinstance(value, tuple):
        return tuple(_static_key(v) for v in value)
    if isinstance(value, Tensor):
        return ("tensor", value.dtype, value.device)
    return type(value).__name__


def _bucket_step(rules: tuple[Rule, ...], projections: tuple[WeightRule, ...], maximize: bool, store: Store,
                 layout: tuple[tuple[str, ...], ...], params: list[Tensor], grads: list[Tensor],
                 states: list[list[list[Tensor]]], hps: list[dict[str, Any]], phps: list[dict[str, Any]],
                 factor: Tensor | None, step: Tensor, grad_scale: Tensor | None, seeds: list[list[Tensor]],
                 offsets: list[int], lanes: Tensor | None, work_dtype: torch.dtype | None = None,
                 weight_seeds: Tensor | None = None) -> None:
    """The chain over every parameter of a bucket, written for ``torch.compile`` to fuse.

    ``states[r][j]`` holds rule ``r``'s state tensor called ``layout[r][j]`` for every parameter: flat
    lists of tensors, not a dict per parameter, because dynamo guards every container it is given on
    every call. ``seeds[r][j]`` (int32, one per parameter) seed that tensor's noise when the store
    rounds stochastically (empty otherwise); ``offsets`` give each tensor's first flat index for it, and
    ``lanes`` (``arange(LANES)``) lets a flat buffer's ``[rows, LANES]`` view build that index cheaply.
    ``work_dtype``: the dtype of the chain (:meth:`Plan.update_dtype`); ``weight_seeds`` (int32, one per
    parameter): the seeds of bfloat16 parameters rounded stochastically (None: the weights are updated in place).
    """
    for i, (p, g) in enumerate(zip(params, grads)):
        u = g / grad_scale if grad_scale is not None else g
        u = -u if maximize else u
        w = p
        if work_dtype is not None:
            u, w = u.to(work_dtype), w.to(work_dtype)
        for r, rule in enumerate(rules):
            stored = {k: states[r][j][i] for j, k in enumerate(layout[r])}
            work = {k: store.load(v) for k, v in stored.items()}
            u = rule.update(u, w, work, hps[r], step)
            for j, (k, v) in enumerate(stored.items()):
                if work[k] is not v:
                    store.store_(v, work[k], seeds[r][j][i] if seeds else 0, offsets[i] if seeds else 0, lanes=lanes)
        new = w.float() if weight_seeds is not None and w.dtype != torch.float32 else w
        if factor is not None:
            new = new * factor if weight_seeds is not None else new.mul_(factor)
        if weight_seeds is not None:
            param_store().store_(p, new + u, weight_seeds[i], offsets[i], lanes=lanes)
        else:
            new.add_(u)
        for projection, php in zip(projections, phps):
            projection.project_(p, php)


def _fresh_function(fn: Callable[..., Any], tag: int) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object, hence its own dynamo cache and recompile budget."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def inductor_options(stochastic_store: bool) -> dict[str, Any]:
    """The inductor settings of a compiled step.

    ``size_asserts`` off: they re-check every input's shape and stride on each call, which dynamo's
    guards have just done. For state stored in bfloat16 on an AVX-512 CPU, 256-bit vectors:
    inductor's loops take 16 floats per iteration, so 16 bf16 values are half a 512-bit vector,
    loaded and stored with masked instructions; at 256 bits they are plain loads and stores.
    """
    options: dict[str, Any] = {"size_asserts": False}
    if stochastic_store:
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
        backend: the ``torch.compile`` backend (default: :data:`BACKEND` when the step is first compiled).
        quiet: report a compile failure in the ``descend.optim`` log instead of a ``RuntimeWarning``
            (``engine="auto"``, where the user asked for no engine in particular).
    """

    name = "compiled"

    def __init__(self, plan: Plan, source: Source, backend: Any = None, quiet: bool = False) -> None:
        super().__init__(plan, source)
        self.backend = backend
        self.quiet = quiet
        self.fallback: ForeachEngine | None = None
        self.eager: ForeachEngine | None = None  # steps the buckets whose store torch.compile cannot trace
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
        if self.eager is not None:
            self.eager.reset()

    def run_bucket(self, bucket: Bucket) -> list[KernelRun]:
        if self.fallback is not None:
            return self.fallback.run_bucket(bucket)
        items = bucket.items
        group, store = bucket.group, self.plan.store_of(bucket.items[0].param.dtype)
        if not store.traceable:  # (8-bit state) the foreach engine steps the bucket, projections after it
            self.eager = self.eager or ForeachEngine(self.plan, self.source)
            self.outside = list(self.plan.projections)
            return self.eager.run_bucket(bucket)
        rules = tuple(rule for rule, _ in bucket.active)
        # a ball projection needs each parameter whole: a flat buffer's are applied after the step
        whole_params = all(item.whole_param for item in items)
        projections = tuple(pr for pr in self.plan.projections if whole_params or pr.elementwise)
        self.outside = [pr for pr in self.plan.projections if pr not in projections]
        params = [item.param for item in items]
        active = with_scalars(bucket.active, int(bucket.step.item()))
        hps = [as_tensors(hp, rule.static) for rule, hp in active]
        phps = [as_tensors(projection.read(group), ()) for projection in projections]
        factor = (torch.tensor(float(bucket.weight_factor), dtype=torch.float64)
                  if scales_weights(bucket.weight_factor) else None)
        key = (rules, bool(group["maximize"]), store, bucket.grad_scale is not None, factor is None,
               tuple((hp[k] if k in rule.static else _static_key(v)) for (rule, hp), hps_r in zip(active, hps)
                     for k, v in hps_r.items()),
               # the bucket shares device and dtypes; shapes and strides per tensor. dynamo's own guards
               # check every input as well, so a difference this key misses recompiles instead of failing.
               params[0].device, params[0].dtype, items[0].grad.dtype,
               tuple(t.dtype for t in items[0].states),  # (8-bit state: its codes' dtype)
               tuple((p.shape, p.stride()) for p in params))
        scale = None if bucket.grad_scale is None else bucket.grad_scale.to(params[0].device, torch.float32)
        layout = state_layout(active)
        first = [sum(len(names) for names in layout[:r]) for r in range(len(layout))]
        states = [[[item.states[first[r] + j] for item in items] for j in range(len(names))]
                  for r, names in enumerate(layout)]
        seeds = store.seeds(bucket.step, [item.ordinal for item in items], layout, params[0].device)
        rounded = self.plan.rounds_params(params[0].dtype)
        weight_seeds = param_seeds(bucket.step, [item.ordinal for item in items], params[0].device) if rounded else None
        noisy = bool(seeds) or rounded
        try:  # torch.compile itself raises where dynamo is unsupported (some Python versions, platforms)
            fn = self.cache.get(key)
            if fn is None:
                backend = self.backend or BACKEND
                options = inductor_options(store.stochastic or rounded) if backend == "inductor" else None
                fn = torch.compile(_fresh_function(_bucket_step, len(self.cache)), backend=backend,
                                   fullgraph=True, dynamic=False, options=options)
                self.cache[key] = fn
            fn(rules, projections, bool(group["maximize"]), store, layout, params, [item.grad for item in items],
               states, hps, phps, factor, bucket.step, scale, seeds,
               [item.offset for item in items] if noisy else [],
               self.lanes_on(params[0].device) if noisy else None,
               self.plan.update_dtype(params[0].dtype), weight_seeds)
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
            return self.fallback.run_bucket(bucket)
        return bucket.ran(self.name)

    def project(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if self.fallback is not None:
            super().project(group, params)
        else:  # the compiled step projects inside its fused pass, except what it left outside
            apply_projections(self.outside, group, params)
