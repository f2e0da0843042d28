"""How a chain's step executes. Every engine computes what the reference engine computes.

- :mod:`~descend.optim.engines.reference` (``engine="reference"``): one parameter at a time; the oracle.
- :mod:`~descend.optim.engines.foreach` (``engine="foreach"``): a bucket's parameters together, each
  operation of a rule one multi-tensor operation (:mod:`~descend.optim.engines.tensorlist`).
- :mod:`~descend.optim.engines.compiled` (``engine="compiled"``): a bucket's chain as one ``torch.compile`` pass.
- :mod:`~descend.optim.engines.native` (``engine="native"``): a bucket's chain as one generated C loop.
- :mod:`~descend.optim.engines.fused` (``engine="fused"``): torch's fused Adam, AdamW and SGD kernels.
- :mod:`~descend.optim.engines.auto` (``engine="auto"``, the default): picks one of those per bucket.

What they share: :mod:`~descend.optim.engines.plan`, :mod:`~descend.optim.engines.bucket` and
:mod:`~descend.optim.engines.store`. Why each engine exists and when ``auto`` picks it:
``docs/guide/engines.md``; how they are built: ``docs/design/engines.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from descend.optim.engines.auto import AutoEngine
from descend.optim.engines.compiled import CompiledEngine
from descend.optim.engines.foreach import ForeachEngine
from descend.optim.engines.fused import fused_engine
from descend.optim.engines.native import NativeEngine
from descend.optim.engines.plan import Engine, KernelRun, Plan, Source
from descend.optim.engines.reference import ReferenceEngine

#: The engines by name (``engine=...``), in the order the docs list them.
ENGINES: dict[str, Callable[[Plan, Source], Engine]] = {
    "auto": AutoEngine,
    "reference": ReferenceEngine,
    "foreach": ForeachEngine,
    "compiled": CompiledEngine,
    "fused": fused_engine,
}
ENGINES["native"] = NativeEngine  # the generated-C engine (engines/native/); auto runs CPU buckets on it
ENGINES["auto"] = partial(AutoEngine, native=ENGINES.get("native"))


def make_engine(name: str, plan: Plan, source: Source) -> Engine:
    """The engine called ``name`` running ``plan`` over ``source``'s parameters."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {name!r}")
    return ENGINES[name](plan, source)


__all__ = ["ENGINES", "Engine", "KernelRun", "Plan", "make_engine"]
