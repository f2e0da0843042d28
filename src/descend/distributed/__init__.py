"""descend.distributed: data-parallel training on PyTorch's own engine (torchrun, DDP, FSDP2, DCP).

A script runs unchanged as one process (``python train.py``) or as ``W`` (``torchrun
--nproc_per_node=W train.py``); the global batch, and so every step, is the same::

    from descend import distributed as dd, optim
    from descend.train import Minibatch

    @dd.entrypoint                      # a failing rank prints "descend: rank R failed: ..." and ends the job
    def main():
        dd.setup()                      # gloo on CPU, nccl on CUDA; timeouts set; no-op outside torchrun
        model = dd.wrap(make_model(), "fsdp")        # or "ddp" / "none"
        opt = optim.AdamW(model.parameters(), lr=1e-3)
        sampler = Minibatch(n, batch_size=256, seed=0)  # the same global batches on every rank
        for step in range(steps):
            (idx,) = sampler.next_step()
            mine = dd.shard(idx)                                          # this rank's share
            loss = loss_fn(model(x[mine]), y[mine], reduction="sum") * dd.grad_scale(len(idx))
            opt.zero_grad(); loss.backward(); opt.step()                  # the single-process step
            if dd.is_main(): print(step, dd.reduce_metrics({"loss": ...}, count=len(mine)))
        dd.save_checkpoint("ckpt/step_100", model, opt, extra={"step": steps})
        dd.teardown()

``descend.train.Trainer`` runs this loop for you (micro-batches, clipping, checkpoints); this
package sits below ``descend.train`` and never imports it.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from descend.distributed._env import (
    DEFAULT_TIMEOUT_S,
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    default_backend,
    device,
    die_with_parent,
    entrypoint,
    info,
    is_distributed,
    is_main,
    launch,
    launched,
    local_rank,
    rank,
    reduce_metrics,
    setup,
    teardown,
    torchrun_command,
    world_size,
)
from descend.distributed._shard import Batch, batch_size_of, grad_norm, grad_scale, local_tensor, shard, total_norm
from descend.distributed._wrap import (
    STRATEGIES,
    check_wrapped,
    default_fsdp_units,
    is_data_parallel,
    load_full_state,
    sync_gradients,
    unwrap,
    wrap,
)

if TYPE_CHECKING:  # for type checkers and the API reference
    from descend.checkpoint._distributed import full_state_dict, latest_checkpoint, load_checkpoint, save_checkpoint

#: The DCP checkpoint functions live in descend.checkpoint, which imports this package; they are
#: looked up on first use so that neither package imports the other while it loads.
_FORWARDED = dict.fromkeys(
    ("full_state_dict", "latest_checkpoint", "load_checkpoint", "save_checkpoint"),
    "descend.checkpoint._distributed",
)


def __getattr__(name: str) -> Any:
    if name in _FORWARDED:
        return getattr(import_module(_FORWARDED[name]), name)
    raise AttributeError(f"module 'descend.distributed' has no attribute {name!r}")

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STRATEGIES",
    "Batch",
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "batch_size_of",
    "broadcast_object",
    "check_wrapped",
    "default_backend",
    "default_fsdp_units",
    "device",
    "die_with_parent",
    "entrypoint",
    "full_state_dict",
    "grad_norm",
    "grad_scale",
    "info",
    "is_data_parallel",
    "is_distributed",
    "is_main",
    "latest_checkpoint",
    "launch",
    "launched",
    "load_checkpoint",
    "load_full_state",
    "local_rank",
    "local_tensor",
    "rank",
    "reduce_metrics",
    "save_checkpoint",
    "setup",
    "shard",
    "sync_gradients",
    "teardown",
    "torchrun_command",
    "total_norm",
    "unwrap",
    "world_size",
    "wrap",
]
