"""``engine="auto"`` (the default): per bucket, the engine that runs it fastest while computing what it must.

On the CPU, the native loop for every chain it can run (it leaves the rest to the foreach engine); no
torch kernel, because each of the two computes what the reference engine computes, and torch's CPU
kernels compute in another order (fused SGD even leaves half-precision weights unchanged in torch
2.13). Elsewhere, torch's Adam, AdamW or SGD kernel where :func:`~descend.optim.engines.fused.torch_kernel`
finds one, the compiled engine for a flat buffer (``flat=True``) of at least :data:`COMPILE_MIN`
elements, the foreach engine otherwise. A compile failure falls back and is logged, never raised.
Why these choices: ``docs/guide/engines.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from descend.optim.engines.bucket import Bucket, BucketEngine, SortedGroup
from descend.optim.engines.compiled import CompiledEngine
from descend.optim.engines.foreach import ForeachEngine
from descend.optim.engines.fused import FusedEngine, torch_kernel
from descend.optim.engines.plan import KernelRun, Plan, Source

#: Fewest elements of a flat buffer for which ``engine="auto"`` compiles its step.
COMPILE_MIN = 1 << 20


class AutoEngine(BucketEngine):
    """Holds the engines it delegates to and picks one per bucket (:meth:`engine_for`).

    ``native``: the native engine's class (None: there is none), built with ``quiet=True`` and this
    engine's foreach engine; its param-group cache is consulted before a group is sorted into buckets.
    ``compile_min``: fewest elements of a flat buffer that, off the CPU, runs on the compiled engine.
    """

    name = "auto"

    def __init__(self, plan: Plan, source: Source, native: Callable[..., Any] | None = None,
                 compile_min: int = COMPILE_MIN) -> None:
        super().__init__(plan, source)
        self.compile_min = compile_min
        self.foreach = ForeachEngine(plan, source)
        self.compiled = CompiledEngine(plan, source, quiet=True)
        self.fused = FusedEngine(plan, source, foreach=self.foreach)
        self.native = native(plan, source, quiet=True, foreach=self.foreach) if native is not None else None

    def reset(self) -> None:
        super().reset()
        for engine in (self.foreach, self.compiled, self.fused, self.native):
            if engine is not None:
                engine.reset()

    def engine_for(self, bucket: Bucket) -> BucketEngine:
        item = bucket.items[0]
        on_cpu = item.param.device.type == "cpu"
        if on_cpu and self.native is not None and not self.native.broken:
            return self.native
        if not on_cpu and torch_kernel(self.plan, bucket) is not None:
            return self.fused
        flat = len(bucket.items) == 1 and not item.whole_param
        return self.compiled if flat and item.param.numel() >= self.compile_min else self.foreach

    def step_group(self, index: int, group: dict[str, Any], clip_coef: Any,
                   grad_scale: Tensor | None) -> SortedGroup | None:
        if self.native is not None:
            run = self.native.repeat_group(index, group, clip_coef, grad_scale)
            if run is not None:
                self.report.append(run)
                return None
        sorted_group = super().step_group(index, group, clip_coef, grad_scale)
        if self.native is not None and sorted_group is not None:
            self.native.remember_group(index, group, sorted_group, grad_scale, self.report)
        return sorted_group

    def run_bucket(self, bucket: Bucket) -> list[KernelRun]:
        return self.engine_for(bucket).run_bucket(bucket)
