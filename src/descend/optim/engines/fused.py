"""``engine="fused"``: torch's own fused kernels for the chains that are exactly torch's Adam, AdamW or SGD.

``torch._fused_adam_``, ``torch._fused_adamw_`` and ``torch._fused_sgd_`` compute the same equations as
the rules (:func:`~descend.optim.scale_by_adam`, :func:`~descend.optim.heavy_ball`),
evaluated in another order, so their results are close to the reference engine's, not equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from descend.optim.engines.bucket import Bucket, BucketEngine
from descend.optim.engines.foreach import ForeachEngine
from descend.optim.engines.plan import KernelRun, Plan, Source
from descend.optim.rules.base import Rule
from descend.optim.rules.descent import L2, DecoupledDecay, ScaleByLR
from descend.optim.rules.momentum import HeavyBall
from descend.optim.rules.normalised import ScaleByAdam

#: Device types torch has fused Adam, AdamW and SGD kernels for.
FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())


def torch_form(rules: Sequence[Rule], decays: Sequence[Rule]) -> str | None:
    """Which of torch's chains the update ``rules`` and decoupled ``decays`` form: ``"adam"`` (``[l2] adam
    scale_by_lr``, with at most one lr-scaled decoupled decay: AdamW), ``"sgd"`` (``[l2] [heavy_ball]
    scale_by_lr``, likewise), or None."""
    kinds = [type(rule) for rule in rules]
    if kinds and kinds[0] is L2:
        kinds = kinds[1:]
    if len(decays) > 1 or not all(isinstance(d, DecoupledDecay) and d.lr_scaled for d in decays):
        return None
    if kinds == [ScaleByAdam, ScaleByLR]:
        return "adam"
    if kinds in ([HeavyBall, ScaleByLR], [ScaleByLR]):
        return "sgd"
    return None


def is_torch_chain(plan: Plan) -> bool:
    """Whether a plan's chain is torch's Adam, AdamW or SGD (:func:`torch_form`, no projection)."""
    return not plan.projections and torch_form(plan.rules, plan.decays) is not None


def torch_kernel(plan: Plan, bucket: Bucket) -> Callable[[], None] | None:
    """torch's fused kernel that computes this bucket's step, as a call ready to run, or None.

    A bucket qualifies when its active chain has a :func:`torch_form`, with no projection, no clipping,
    no ``grad_scale`` (torch's kernels unscale ``.grad`` in place; the chain leaves it as it is), no L2
    beside decoupled decay, and a store that keeps state as it is (torch's kernels round to nearest);
    and parameters, gradients and state share one dtype on a device torch has fused kernels for. Not
    bfloat16 parameters rounded stochastically (:meth:`Plan.rounds_params`; torch's kernels round to
    nearest), nor SGD in half precision on the CPU: torch 2.13's kernel leaves such weights unchanged.
    """
    items, group = bucket.items, bucket.group
    if bucket.grad_scale is not None or plan.projections or not items or not plan.store_of(items[0].param.dtype).as_is:
        return None
    if plan.rounds_params(items[0].param.dtype):
        return None
    rules = [rule for rule, _ in bucket.active]
    hps = [hp for _, hp in bucket.active]
    decays = [rule for rule in plan.decays if rule.active(rule.read(group))]
    form = torch_form(rules, decays)
    if form is None:
        return None
    l2 = 0.0
    if type(rules[0]) is L2:
        l2 = float(hps[0]["weight_decay"])
        hps = hps[1:]
        if decays:
            return None
    p0 = items[0].param
    dtype = p0.dtype
    # a bucket shares the parameters' and the gradients' dtype (BucketEngine.step_group keys on both), and its
    # state has the parameters' dtype unless the optimizer keeps it in another dtype, which it does for every
    # parameter: the first parameter's state speaks for the bucket (torch's kernel checks every tensor)
    if (p0.device.type not in FUSED_DEVICES or not dtype.is_floating_point or items[0].grad.dtype != dtype
            or any(t.dtype != dtype for t in items[0].states)):
        return None
    params = [it.param for it in items]
    grads = [it.grad for it in items]
    lr = group["lr"]
    lr = float(lr) if not torch.is_tensor(lr) else lr
    maximize = bool(group["maximize"])
    if form == "adam":
        hp = hps[0]
        amsgrad = bool(hp["amsgrad"])
        beta1, beta2 = (float(b) for b in hp["betas"])
        columns = [[it.states[j] for it in items] for j in range(3 if amsgrad else 2)]
        if decays:
            fn, weight_decay = torch._fused_adamw_, float(decays[0].read(group)["weight_decay"])
        else:
            fn, weight_decay = torch._fused_adam_, l2
        steps = [bucket.step.to(p0.device, torch.float32)] * len(params)  # read, not advanced, by the kernel

        def adam() -> None:
            fn(params, grads, columns[0], columns[1], columns[2] if amsgrad else [], steps,
               lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=float(hp["eps"]),
               amsgrad=amsgrad, maximize=maximize)
        return adam
    if decays or (p0.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)):
        return None
    momentum = len(rules) > 1 and type(rules[-2]) is HeavyBall
    hp = hps[0] if momentum else {"momentum": 0.0, "dampening": 0.0, "nesterov": False}
    buffers = [it.states[0] for it in items] if momentum else []

    def sgd() -> None:
        torch._fused_sgd_(params, grads, buffers, weight_decay=l2, momentum=float(hp["momentum"]), lr=lr,
                          dampening=float(hp["dampening"]), nesterov=bool(hp["nesterov"]), maximize=maximize,
                          is_first_step=False)
    return sgd


class FusedEngine(BucketEngine):
    """torch's fused kernels for the buckets :func:`torch_kernel` matches (``engine="fused"``).

    A bucket no kernel matches (a ``grad_scale``, a parameter dtype without a kernel) runs on the
    foreach engine. ``engine="fused"`` builds it with :func:`fused_engine`, which refuses a chain that is
    not torch's.
    """

    name = "fused"

    def __init__(self, plan: Plan, source: Source, foreach: ForeachEngine | None = None) -> None:
        super().__init__(plan, source)
        self.foreach = foreach or ForeachEngine(plan, source)

    def reset(self) -> None:
        super().reset()
        self.foreach.reset()

    def run_bucket(self, bucket: Bucket) -> list[KernelRun]:
        kernel = torch_kernel(self.plan, bucket)
        if kernel is None:
            return self.foreach.run_bucket(bucket)
        kernel()
        return bucket.ran(self.name)


def fused_engine(plan: Plan, source: Source) -> FusedEngine:
    """``engine="fused"``: a :class:`FusedEngine`, for a chain that is torch's (:func:`is_torch_chain`) only."""
    if not is_torch_chain(plan):
        raise ValueError(f"engine='fused' (fused=True) runs torch's Adam, AdamW and SGD kernels; this chain "
                         f"({plan.describe()}) is none of them: use engine='auto' or engine='compiled'")
    return FusedEngine(plan, source)
