"""descend: train neural networks by descending a loss.

Subpackages, one concern each. The library:

- :mod:`descend.optim`: the optimizer family (rules, chains, named presets, engines).
- :mod:`descend.nn`: linear models, MLPs, residual networks, attention over point sets.
- :mod:`descend.data`: built-in offline datasets (digits, point sets, shapes, GP draws) and loaders.
- :mod:`descend.train`: the training loop and its parts.
- :mod:`descend.checkpoint`: checkpoints without pickle, checksummed and written atomically.
- :mod:`descend.distributed`: data-parallel training with torchrun, DDP and FSDP2.
- :mod:`descend.diagnostics`: gradient-flow and constraint diagnostics.

The applications built on it (the library never imports them):

- :mod:`descend.runs`: run directories behind ``descend train``, ``predict`` and ``generate``.
- :mod:`descend.compare`: the optimizer benchmark behind ``descend compare``.
- :mod:`descend.report`: plots and HTML reports.
- :mod:`descend.experiments`: the studies behind the experiment pages.
- :mod:`descend.cli`: the ``descend`` command.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
