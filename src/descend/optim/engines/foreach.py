"""``engine="foreach"``: each rule runs once per chunk of a bucket, over a :class:`TensorList`.

The parameters of a bucket go through the chain together, so each tensor operation of a rule is one
multi-tensor operation (``torch._foreach_*``) per chunk of at most :data:`CHUNK` elements; temporaries
of large tensors go to reused scratch buffers (:class:`~descend.optim.engines.tensorlist.Scratch`).
"""

from __future__ import annotations

from typing import Any

import torch

from descend.optim.engines.bucket import Bucket, BucketEngine, Item, chunks
from descend.optim.engines.plan import KernelRun, Plan, Source, scales_weights, state_layout, with_scalars
from descend.optim.engines.store import Store, param_seeds, param_store
from descend.optim.engines.tensorlist import Scratch, TensorList

#: Largest number of elements the foreach engine hands to one multi-tensor operation (1 MiB of float32):
#: large enough that per-operation overhead stays small, small enough that a chunk's working set
#: stays in cache and its scratch buffers are few MiB.
CHUNK = 1 << 18


class ForeachEngine(BucketEngine):
    """Multi-tensor execution (see the module docstring); ``chunk``: the most elements per operation;
    ``scratch_min_mean``: see :class:`~descend.optim.engines.tensorlist.Scratch`."""

    name = "foreach"

    def __init__(self, plan: Plan, source: Source, chunk: int = CHUNK, scratch_min_mean: int = 1 << 14) -> None:
        super().__init__(plan, source)
        self.chunk = chunk
        self.scratch_min_mean = scratch_min_mean
        self.scratch = Scratch(chunk, scratch_min_mean)

    def reset(self) -> None:
        super().reset()
        self.scratch = Scratch(self.chunk, self.scratch_min_mean)

    def run_bucket(self, bucket: Bucket) -> list[KernelRun]:
        items, scratch = bucket.items, self.scratch
        store = self.plan.store_of(items[0].param.dtype)
        step = int(bucket.step.item())
        active = with_scalars(bucket.active, step)
        scale = None if bucket.grad_scale is None else bucket.grad_scale.to(items[0].param.device, torch.float32)
        layout = state_layout(active)
        ordinals = [item.ordinal for item in items]
        # per rule, per state tensor: {ordinal: seed}
        seeds = [[dict(zip(ordinals, s.tolist())) for s in per_rule]
                 for per_rule in store.seeds(bucket.step, ordinals, layout, torch.device("cpu"))]
        # a bfloat16 parameter rounded stochastically (as the reference engine steps it): {ordinal: seed}
        dtype = items[0].param.dtype
        rounded = self.plan.rounds_params(dtype)
        work_dtype = self.plan.update_dtype(dtype)
        param_seed = (dict(zip(ordinals, param_seeds(bucket.step, ordinals, torch.device("cpu")).tolist()))
                      if rounded else None)
        for piece in chunks(items, self.chunk, store):
            scratch.reset()  # every temporary of the previous chunk is dead
            w = TensorList([item.param for item in piece], scratch)
            u = TensorList([item.grad for item in piece], scratch)
            if scale is not None:
                u = u / scale
            if bucket.group["maximize"]:
                u = -u
            if work_dtype is not None:
                u, w = u.to(work_dtype), w.to(work_dtype)
            first = 0  # the index in item.states of the rule's first state tensor
            for r, ((rule, hp), names) in enumerate(zip(active, layout)):
                stored = {k: store.gather([item.states[first + j] for item in piece], scratch)
                          for j, k in enumerate(names)}
                first += len(names)
                work = {k: store.load(v) for k, v in stored.items()}
                u = rule.update(u, w, work, hp, step)  # type: ignore[arg-type]
                for j, (k, v) in enumerate(stored.items()):
                    if work[k] is not v:
                        self.store(store, v, work[k], piece, seeds[r][j] if seeds else None)
            new = w.float() if rounded and w.dtype != torch.float32 else w
            if scales_weights(bucket.weight_factor):
                new.mul_(bucket.weight_factor)
            new.add_(u)
            if rounded:
                self.store(param_store(), TensorList([item.param for item in piece]), new, piece, param_seed)
        return bucket.ran(self.name)

    def store(self, store: Store, stored: Any, work: TensorList, piece: list[Item],
              seeds: dict[int, int] | None) -> None:
        """``store.store_`` for every tensor of a chunk, in scratch buffers where they fit.

        ``seeds`` maps each parameter's ordinal to this state tensor's seed for the step (None: no noise).
        """
        buffers = [self.scratch.take(work.tensors, dtype) for dtype in store.scratch_dtypes()]
        usable = all(b is not None for b in buffers)
        for i, (dst, src, item) in enumerate(zip(stored.tensors, work.tensors, piece)):
            store.store_(dst, src, seeds[item.ordinal] if seeds else 0, item.offset,
                         buffers=[b[i] for b in buffers] if usable else None)  # type: ignore[index]
