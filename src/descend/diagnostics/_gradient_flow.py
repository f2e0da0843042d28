"""Gradient-flow diagnostics: how large the gradient is at each layer, and how each block scales it.

Vanishing gradients show as per-layer gradient norms falling by orders of magnitude from the output
side to the input side; exploding gradients as the reverse (or as non-finite norms).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from descend._io import atomic_write

LossFn = Callable[[Tensor, Tensor], Tensor]


def _as_tuple(inputs: Tensor | tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(layer name, weight)`` for every parameter called ``weight`` with at least 2 dimensions.

    That is every ``Linear``/``Conv``-like layer (normalisation scales are 1-D and left out), in
    registration order, which for descend's networks is input side first.
    """
    layers = []
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "weight" and param.dim() >= 2:
            layers.append((name.removesuffix(".weight") or "weight", param))
    return layers


def gradient_flow(model: nn.Module, inputs: Tensor | tuple[Tensor, ...], targets: Tensor,
                  loss_fn: LossFn) -> dict[str, float]:
    """``{layer name: ||dL/dW_layer||_2}`` for ``L = loss_fn(model(*inputs), targets)``, input side first.

    ``W_layer`` is the weight matrix of each layer (see :func:`weight_layers`); the norm is the
    Frobenius norm. The gradients are taken with ``torch.autograd.grad``, so the model's ``.grad``
    fields are left untouched; the model's train/eval mode is the caller's.
    """
    layers = weight_layers(model)
    if not layers:
        raise ValueError("model has no weight matrices (parameters named 'weight' with >= 2 dimensions)")
    loss = loss_fn(model(*_as_tuple(inputs)), targets)
    grads = torch.autograd.grad(loss, [w for _, w in layers], allow_unused=True)
    return {
        name: (0.0 if g is None else float(torch.linalg.vector_norm(g.detach().double())))
        for (name, _), g in zip(layers, grads)
    }


def activation_gradients(model: nn.Module, inputs: Tensor | tuple[Tensor, ...], targets: Tensor, loss_fn: LossFn,
                         blocks: Iterable[tuple[str, nn.Module]] | None = None) -> dict[str, float]:
    """The backward signal: ``{block name: ||dL/dz_b||_2}`` for each block's output ``z_b``, input side first.

    ``L = loss_fn(model(*inputs), targets)``; ``blocks`` as in :func:`layer_gains` (``model.blocks``
    by default). Where weight-gradient norms can hide it (in a linear chain every ``||dL/dW_l||`` is
    the same product of layer scales), this shows vanishing (norms falling towards the input side)
    and exploding (rising) directly. Non-finite values are returned as they are.
    """
    chosen = list(_default_blocks(model) if blocks is None else blocks)
    seen: dict[str, Tensor] = {}
    handles = []
    for name, block in chosen:
        def hook(module: nn.Module, args: tuple[object, ...], output: Tensor, name: str = name) -> None:
            if name not in seen:
                seen[name] = output
        handles.append(block.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            loss = loss_fn(model(*_as_tuple(inputs)), targets)
            names = [n for n, _ in chosen if n in seen and seen[n].requires_grad]
            grads = torch.autograd.grad(loss, [seen[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return {n: (0.0 if g is None else float(torch.linalg.vector_norm(g.detach().double())))
            for n, g in zip(names, grads)}


def _default_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
        return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def layer_gains(model: nn.Module, inputs: Tensor | tuple[Tensor, ...],
                blocks: Iterable[tuple[str, nn.Module]] | None = None, seed: int = 0) -> dict[str, float]:
    """Backward Jacobian gain of each block: ``{name: ||J_b^T g_out|| / ||g_out||}``, input side first.

    The network output ``y`` is contracted with a fixed random direction ``v ~ N(0, I)`` (seeded),
    ``L = <y, v>``; for a block ``b`` mapping ``x_b -> z_b`` with ``g_out = dL/dz_b``, the gain is
    ``||dL/dx_b|| / ||g_out||``. The product of gains is the end-to-end amplification of the backward
    signal: gains ``< 1`` compound into vanishing gradients, ``> 1`` into exploding ones.

    ``blocks`` defaults to ``model.blocks`` when the model has one (descend's MLPs do) and to every
    ``nn.Linear`` otherwise. A block must take its input tensor as first argument and return a tensor;
    if it runs several times, its first call is used.
    """
    chosen = list(_default_blocks(model) if blocks is None else blocks)
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for name, block in chosen:
        def hook(module: nn.Module, args: tuple[object, ...], output: Tensor, name: str = name) -> None:
            if name not in seen and isinstance(args[0], Tensor):
                seen[name] = (args[0], output)
        handles.append(block.register_forward_hook(hook))
    try:
        xs = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in _as_tuple(inputs))
        with torch.enable_grad():
            y = model(*xs)
            v = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
            loss = (y * v.to(y.device)).sum()
            names = [n for n, _ in chosen if n in seen and seen[n][0].requires_grad]
            tensors = [t for n in names for t in seen[n]]
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    gains = {}
    for i, name in enumerate(names):
        g_in, g_out = grads[2 * i], grads[2 * i + 1]
        n_in = 0.0 if g_in is None else float(torch.linalg.vector_norm(g_in.double()))
        n_out = 0.0 if g_out is None else float(torch.linalg.vector_norm(g_out.double()))
        gains[name] = n_in / n_out if n_out > 0 else float("nan")
    return gains


def plot_gradient_flow(results: Mapping[str, Mapping[str, float]], path: str | os.PathLike[str],
                       title: str = "Gradient norm per layer") -> Path:
    """Plot several models' :func:`gradient_flow` results on one log-scale figure; write a PNG.

    ``results`` maps a model label to ``{layer name: gradient norm}`` (input side first); the x axis is
    the layer index. The file is written atomically (:func:`descend._io.atomic_write`), so readers
    never see a half-written image. Returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(7.0, 4.2), dpi=110)
    ax = fig.add_subplot()
    tiny = 1e-45
    for label, norms in results.items():
        ys = [max(float(v), tiny) for v in norms.values()]
        ax.plot(range(len(ys)), ys, marker="o", markersize=2.5, linewidth=1.3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer (input side → output side)")
    ax.set_ylabel("‖∂L/∂W‖")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())
    return path


__all__ = ["activation_gradients", "gradient_flow", "layer_gains", "plot_gradient_flow", "weight_layers"]
