"""``engine="native"``: the chain of a bucket as one generated C loop, on float32 CPU tensors (and bfloat16
parameters rounded stochastically)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from descend.optim.engines.bucket import Bucket, BucketEngine, Item, SortedGroup
from descend.optim.engines.foreach import ForeachEngine
from descend.optim.engines.native.compiler import Kernel, compile_kernel
from descend.optim.engines.native.emit import step_scalars, trace_chain
from descend.optim.engines.native.groups import NativeGroup
from descend.optim.engines.native.tracer import NotTraceable
from descend.optim.engines.plan import ActiveRules, KernelRun, Plan, Source, state_layout
from descend.optim.engines.store import param_seeds

logger = logging.getLogger("descend.optim")


class NativeEngine(BucketEngine):
    """The chain as one generated C loop per bucket (the loop: :mod:`~descend.optim.engines.native.emit`).

    A bucket it cannot run (another device or dtype, a non-contiguous tensor, a ``grad_scale``, a rule
    the tracer cannot express) runs on the foreach engine, as does everything once compiling has failed
    (logged, or warned with ``engine="native"``). Projections apply after the loop, as the foreach
    engine applies them. A group stepped by one loop is remembered (:class:`NativeGroup`, :meth:`repeat_group`).
    """

    name = "native"

    def __init__(self, plan: Plan, source: Source, quiet: bool = False, foreach: ForeachEngine | None = None) -> None:
        super().__init__(plan, source)
        self.quiet = quiet
        self.foreach = foreach or ForeachEngine(plan, source)
        self.kernels: dict[tuple[Any, ...], Kernel | None] = {}
        self.broken = False  # compiling failed: no compiler here
        self.groups: dict[int, NativeGroup] = {}  # by group index
        # by group index: which parameters its last step stepped (ids), to remember it once a step repeats them
        self.last_stepped: dict[int, tuple[int, ...]] = {}

    def reset(self) -> None:
        super().reset()
        self.groups.clear()
        self.last_stepped.clear()
        self.foreach.reset()

    # -- the param-group cache ----------------------------------------------------------------------
    def step_group(self, index: int, group: dict[str, Any], clip_coef: Any,
                   grad_scale: Tensor | None) -> SortedGroup | None:
        run = self.repeat_group(index, group, clip_coef, grad_scale)
        if run is not None:
            self.report.append(run)
            return None
        sorted_group = super().step_group(index, group, clip_coef, grad_scale)
        if sorted_group is not None:
            self.remember_group(index, group, sorted_group, grad_scale, self.report)
        return sorted_group

    def repeat_group(self, index: int, group: dict[str, Any], clip_coef: Any,
                     grad_scale: Tensor | None) -> KernelRun | None:
        """Step group ``index`` as its last step did (one loop over all its parameters) if nothing that step
        relied on has changed; None (nothing done, the group forgotten) otherwise."""
        remembered = self.groups.get(index)
        if remembered is None or clip_coef is not None or grad_scale is not None:
            return None
        if not remembered.step_again(self.plan, group, self.source.state):
            del self.groups[index]
            return None
        self.project(group, remembered.params)
        return KernelRun(index, self.name, len(remembered.params))

    def remember_group(self, index: int, group: dict[str, Any], stepped: SortedGroup, grad_scale: Tensor | None,
                       report: list[KernelRun]) -> None:
        """Remember group ``index`` if its step was one loop over every parameter with a gradient, the same
        parameters as its step before (a group stepped one parameter at a time, as inside the backward pass,
        is never remembered: each step would forget the one before)."""
        stepped_ids = tuple(map(id, stepped.params))
        if self.last_stepped.get(index) != stepped_ids:
            self.last_stepped[index] = stepped_ids
            return
        runs = [run for run in report if run.group == index]
        if (grad_scale is None and stepped.params and not self.plan.store_of(stepped.params[0].dtype).stochastic
                and not self.plan.rounds_params(stepped.params[0].dtype)
                and runs == [KernelRun(index, self.name, len(stepped.items))]
                and len(stepped.items) + len(stepped.without_grad) == len(group["params"])
                and all(item.param is p or item.param._base is p for item, p in zip(stepped.items, stepped.params))):
            remembered = NativeGroup(self, group, stepped)
            if remembered.read_hyper(self.plan, group):
                self.groups[index] = remembered

    # -- one bucket ---------------------------------------------------------------------------------
    def supports(self, bucket: Bucket) -> bool:
        """Whether the loop may step this bucket: float32 CPU parameters and gradients (or bfloat16 ones
        rounded stochastically, whose chain runs in float32), a store the loop can express, no unscaling
        (:meth:`split` checks each tensor)."""
        p0, g0 = bucket.items[0].param, bucket.items[0].grad
        if self.broken or bucket.grad_scale is not None or self.plan.store_of(p0.dtype).c_type is None:
            return False
        if p0.device.type != "cpu" or g0.dtype not in (torch.float32, torch.bfloat16):
            return False
        if p0.dtype == torch.float32:
            return g0.dtype == torch.float32
        return self.plan.update_dtype(p0.dtype) == torch.float32

    def split(self, items: list[Item]) -> tuple[list[Item], list[int], list[int], list[Item]]:
        """The items the loop can step (every tensor contiguous, the state as the store keeps it:
        :meth:`Store.c_addresses`) with the addresses of their ``w``, ``g`` and state arrays and their sizes;
        and the rest. A bucket shares
        ``w``'s and ``g``'s dtypes, which :meth:`supports` has checked (float32)."""
        store = self.plan.store_of(items[0].param.dtype)
        ready: list[Item] = []
        pointers: list[int] = []
        sizes: list[int] = []
        rest: list[Item] = []
        for item in items:
            w, g = item.param, item.grad
            ok = w.is_contiguous() and g.is_contiguous()
            addresses = [w.data_ptr(), g.data_ptr()] if ok else []
            for t in item.states if ok else ():
                arrays = store.c_addresses(t)
                if arrays is None:
                    ok = False
                    break
                addresses += arrays
            if ok:
                ready.append(item)
                pointers += addresses
                sizes.append(w.numel())
            else:
                rest.append(item)
        return ready, pointers, sizes, rest

    def kernel(self, active: ActiveRules, maximize: bool, decays: bool, shapes: tuple[tuple[Any, ...], ...],
               rounded: bool = False, grad_bf16: bool = False) -> Kernel | None:
        """The compiled loop for this chain and hyperparameter shape (None: the tracer cannot express it);
        ``rounded``: for bfloat16 parameters rounded stochastically; ``grad_bf16``: bfloat16 gradients."""
        rules = tuple(rule for rule, _ in active)
        store = self.plan.store_of(torch.bfloat16 if rounded else torch.float32)  # the loop's two parameter dtypes
        key = (rules, maximize, decays, shapes, store, rounded, grad_bf16)
        if key not in self.kernels:
            layout = state_layout(active)
            try:
                source = trace_chain(rules, layout, shapes, maximize, decays, store, rounded, grad_bf16)
            except NotTraceable as err:
                logger.info("descend: engine=%r runs %s on the foreach engine: %s",
                            self.name, self.plan.describe(), err)
                self.kernels[key] = None
                return None
            try:
                states = sum(len(names) for names in layout)
                kernel = compile_kernel(source, 2 + len(store.c_arrays) * states)
                kernel.seed_columns = (states if store.stochastic else 0) + rounded
                self.kernels[key] = kernel
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

    def prepare(self, group: dict[str, Any], active: ActiveRules, factor: Any, step: int, rounded: bool = False,
                grad_bf16: bool = False) -> tuple[Kernel, list[float]] | None:
        """The compiled loop for this chain and its scalars at step number ``step`` (see
        :func:`step_scalars`; ``rounded``, ``grad_bf16``: see :meth:`kernel`); None if the chain has no loop."""
        try:
            scalars, shapes, decays = step_scalars(active, factor, step)
        except NotTraceable:
            return None
        kernel = self.kernel(active, bool(group["maximize"]), decays, shapes, rounded, grad_bf16)
        return None if kernel is None else (kernel, scalars)

    def run_bucket(self, bucket: Bucket) -> list[KernelRun]:
        if not self.supports(bucket):
            return self.foreach.run_bucket(bucket)
        items = bucket.items
        ready, pointers, sizes, rest = self.split(items)  # e.g. a transposed parameter: the rest
        if not ready or not self.run_native(bucket, ready, pointers, sizes):
            return self.foreach.run_bucket(bucket)
        return bucket.part(ready).ran(self.name) + (self.foreach.run_bucket(bucket.part(rest)) if rest else [])

    def run_native(self, bucket: Bucket, items: list[Item], pointers: Sequence[int], sizes: Sequence[int]) -> bool:
        """Step ``items`` (at ``pointers``: per item ``w``, ``g``, its state tensors) with the compiled
        loop; False (nothing done) if the chain has none."""
        rounded = self.plan.rounds_params(items[0].param.dtype)
        prepared = self.prepare(bucket.group, bucket.active, bucket.weight_factor, int(bucket.step.item()),
                                rounded, items[0].grad.dtype == torch.bfloat16)
        if prepared is None:
            return False
        kernel, scalars = prepared
        store = self.plan.store_of(items[0].param.dtype)
        if store.stochastic or rounded:  # per tensor: the seeds of each state's rounding noise, then w's
            ordinals = [item.ordinal for item in items]
            seeds = store.seeds(bucket.step, ordinals, state_layout(bucket.active), torch.device("cpu"))
            columns = [s for per_rule in seeds for s in per_rule]
            if rounded:
                columns.append(param_seeds(bucket.step, ordinals, torch.device("cpu")))
            stacked = torch.stack(columns, dim=1).contiguous() if columns else None
            kernel(pointers, sizes, scalars, [item.offset for item in items], stacked)
        else:
            kernel(pointers, sizes, scalars)
        return True
