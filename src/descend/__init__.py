"""descend: train neural networks by descending a loss.

Subpackages, one concern each:

- :mod:`descend.optim`: the optimizer family (rules, chains, named presets, engines).
- :mod:`descend.nn`: linear models, MLPs, residual networks, attention over point sets.
- :mod:`descend.data`: built-in offline datasets (digits, point sets, shapes, GP draws) and loaders.
- :mod:`descend.train`: the training loop, checkpoints and metrics.
- :mod:`descend.diagnostics`: gradient-flow and constraint diagnostics.
- :mod:`descend.report`: plots and HTML reports.
- :mod:`descend.cli`: the ``descend`` command.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
