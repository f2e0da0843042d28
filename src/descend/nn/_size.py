"""How large a model of :data:`descend._options.MODELS` will be, known before anything is allocated."""

from __future__ import annotations

import os

from descend._options import MODELS, OptionError

#: The largest model (parameters) a run may allocate; beyond it a run refuses to start.
MAX_PARAMETERS = 10_000_000_000


def parameter_estimate(model: str, depth: int, width: int, inputs: int, outputs: int) -> int:
    """An estimate of the parameter count of the model ``model`` (a name of ``--model``).

    ``inputs`` is the feature count (vectors) or ``location_dim + value_dim`` (point sets). MLP:
    ``(in+1)·w + (depth−1)·(w+1)·w + (w+1)·out``; residual MLP, point-set and transformer blocks are
    counted as ``depth`` blocks of ``c·w²`` with ``c = 2`` (two linear layers) and ``12`` (attention's
    four projections plus a 4×-wide feed-forward).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if model == "linear" or (model == "mlp" and depth == 0):
        return (inputs + 1) * outputs
    if model == "mlp":
        return (inputs + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * outputs
    per_block = 2 if model == "resmlp" else 12
    return (inputs + 1) * width + depth * per_block * (width + 1) * width + (width + 1) * outputs


def check_model_size(model: str, depth: int, width: int, inputs: int, outputs: int, memory_bytes: int | None,
                     bytes_per_parameter: float = 16) -> None:
    """Refuse, before allocation, a model whose weights, gradients and optimizer state
    (``bytes_per_parameter``: 16 for float32 weights, gradients and two state tensors) would not fit in
    half of ``memory_bytes`` (or beyond :data:`MAX_PARAMETERS`): :class:`~descend._options.OptionError`."""
    n = parameter_estimate(model, depth, width, inputs, outputs)
    per = max(1.0, bytes_per_parameter)
    budget = MAX_PARAMETERS if memory_bytes is None else min(MAX_PARAMETERS, int(memory_bytes / 2 / per))
    if n > budget:
        raise OptionError(
            f"--depth {depth} --width {width} gives model {model!r} about {n:.3g} parameters "
            f"({per * n / 2**30:.3g} GiB with gradients and optimizer state), more than the {budget:.3g} this machine "
            "allows; choose a smaller --depth or --width"
        )


def physical_memory() -> int | None:
    """Bytes of physical memory (``None`` where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None
