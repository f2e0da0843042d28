"""The native engine: a chain's step generated as one C loop from the rules themselves, compiled once per machine.

- :mod:`~descend.optim.engines.native.tracer`: symbols the rules' tensor code runs on, each operation a line of C;
- :mod:`~descend.optim.engines.native.emit`: the loop's C source, and its scalars each step;
- :mod:`~descend.optim.engines.native.compiler`: the C compiler, the kernel cache, the loaded kernel;
- :mod:`~descend.optim.engines.native.groups`: the cache of param groups stepped by one loop;
- :mod:`~descend.optim.engines.native.engine`: :class:`NativeEngine`, which runs them.

Deleting this package and its registration in :mod:`descend.optim.engines` removes the engine; ``engine="auto"``
then runs CPU buckets on the foreach engine.
"""

from descend.optim.engines.native.engine import NativeEngine

__all__ = ["NativeEngine"]
