"""Depth: per-layer gradient norms of plain and residual networks, and whether they train."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from descend import optim
from descend.diagnostics import gradient_flow
from descend.experiments._common import Outcome, digits, loss_of, minibatches, new_figure, seed_all
from descend.nn import MLP, ResidualMLP

WIDTH = 64


def _model(kind: str, activation: str, depth: int) -> nn.Module:
    if kind == "plain":
        return MLP(64, 10, hidden=WIDTH, depth=depth, activation=activation)
    return ResidualMLP(64, 10, width=WIDTH, depth=depth, activation=activation)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed + 1)
    opt = optim.Momentum(model.parameters(), lr=0.1, beta=0.9)
    batches = minibatches(len(y), 64, gen)
    curve = [loss_of(model, x, y)]
    for t in range(1, steps + 1):
        idx = next(batches)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if t % 10 == 0:
            curve.append(loss_of(model, x, y))
    return curve


def depth(*, quick: bool = False, seed: int = 0) -> Outcome:
    """Plain deep sigmoid/tanh nets lose the gradient at the input side; residual nets keep it.

    At initialisation (PyTorch's default init for the plain :class:`descend.nn.MLP`, He init and
    pre-LayerNorm blocks for :class:`descend.nn.ResidualMLP`, width 64), the gradient norm of every
    weight matrix (:func:`descend.diagnostics.gradient_flow`, cross-entropy on 512 digits) for
    sigmoid, tanh and ReLU nets of depth 2, 4, 8, 16 (and 32) hidden layers; the first layer's norm
    against depth, and each layer's at depth 16. Then all depth-16 nets are trained by EMA momentum
    (beta 0.9, lr 0.1, minibatches of 64) for 300 steps. Reported: the first-layer gradient norms and
    the final training losses.
    """
    x, y, _, _ = digits(seed)
    depths = (2, 4, 8, 16) if quick else (2, 4, 8, 16, 32)
    nets = [("plain", a) for a in ("sigmoid", "tanh", "relu")] + [("residual", a) for a in ("sigmoid", "relu")]
    probe = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:512]
    flows: dict[str, dict[int, dict[str, float]]] = {}
    for kind, act in nets:
        label = f"{kind} {act}"
        flows[label] = {}
        for d in depths:
            seed_all(seed)
            flows[label][d] = gradient_flow(_model(kind, act, d), x[probe], y[probe], nn.functional.cross_entropy)
    first = {label: {d: next(iter(f.values())) for d, f in by_depth.items()} for label, by_depth in flows.items()}
    steps = 150 if quick else 300
    curves = {}
    for kind, act in nets:
        seed_all(seed)
        curves[f"{kind} {act}"] = _train(_model(kind, act, 16), x, y, steps, seed)
    ratio = first["residual sigmoid"][16] / max(first["plain sigmoid"][16], 1e-300)
    numbers: dict[str, Any] = {
        "depths": list(depths), "width": WIDTH, "first_layer_gradient_norm": first,
        "residual_over_plain_sigmoid_first_layer_depth16": ratio,
        "final_loss_depth16": {label: c[-1] for label, c in curves.items()}, "train_steps": steps,
        "gradient_flow_depth16": {label: f[16] for label, f in flows.items()},
        "curves": curves,
    }
    finding = [f"first-layer gradient norm at depth {', '.join(map(str, depths))}:"]
    finding += [f"  {label:>16}: " + ", ".join(f"{v:.1e}" for v in by_depth.values())
                for label, by_depth in first.items()]
    finding.append(f"depth 16: residual sigmoid / plain sigmoid first-layer gradient = {ratio:.1e}")
    finding.append(f"depth 16, training loss after {steps} steps: "
                   + ", ".join(f"{label} {c[-1]:.3f}" for label, c in curves.items()))

    fig, (ax1, ax2, ax3) = new_figure(3, width=4.0)
    for label, by_depth in first.items():
        style = "--" if label.startswith("residual") else "-"
        ax1.plot(list(by_depth), list(by_depth.values()), style, marker="o", markersize=3, label=label)
        norms = list(flows[label][16].values())
        ax2.plot(range(len(norms)), norms, style, marker=".", markersize=3, label=label)
        ax3.plot([10 * i for i in range(len(curves[label]))], curves[label], style, label=label)
    ax1.set(xscale="log", yscale="log", xlabel="hidden layers", ylabel="‖∂L/∂W‖ of the first layer",
            title="gradient reaching the input side")
    ax1.set_xticks(list(depths), [str(d) for d in depths])
    ax2.set(yscale="log", xlabel="layer (input side → output)", ylabel="‖∂L/∂W‖", title="per layer, 16 hidden layers")
    ax3.set(yscale="log", xlabel="step (momentum, lr 0.1)", ylabel="training loss", title="training, 16 hidden layers")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    return Outcome(numbers, fig, finding)
