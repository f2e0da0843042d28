"""Depth: skip connections with the same init and norm, the init gain, and the bare residual's blow-up."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from descend import optim
from descend._random import generator, seed_everything
from descend.diagnostics import activation_gradients, gradient_flow
from descend.experiments._common import (
    PALETTE,
    Outcome,
    band,
    digits,
    finding,
    loss_of,
    new_figure,
    span,
    tune,
    tuned_dict,
)
from descend.nn import MLP, ResidualMLP
from descend.train import Minibatch

WIDTH = 64
GAINS = (0.5, 1.0, math.sqrt(2), 4.0)
NETS = (("plain", "relu"), ("residual", "relu"), ("plain", "sigmoid"), ("residual", "sigmoid"))


def _net(kind: str, activation: str, depth: int, norm: str | None = "layer") -> nn.Module:
    """``ResidualMLP`` (He init, pre-LayerNorm) with or without the skip: the same parameters either way."""
    return ResidualMLP(64, 10, width=WIDTH, depth=depth, activation=activation, residual=kind == "residual", norm=norm)


def _train(kind: str, activation: str, depth: int, lr: float, seed: int, steps: int) -> tuple[float, dict[str, Any]]:
    """Adam, minibatches of 64: final validation loss (the tuning score), and the final training loss (full
    training set) and test loss."""
    data = digits(seed)
    seed_everything(seed)
    model = _net(kind, activation, depth)
    opt = optim.Adam(model.parameters(), lr=lr)
    sampler = Minibatch(len(data.y), 64, seed=seed)
    for _ in range(steps):
        (idx,) = sampler.next_step()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
        opt.step()
    return loss_of(model, data.x_val, data.y_val), {"train_loss": loss_of(model, data.x, data.y),
                                                    "test_loss": loss_of(model, data.x_test, data.y_test)}


def _probe(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = digits(seed)
    pick = torch.randperm(len(data.y), generator=generator(seed))[:256]
    return data.x[pick], data.y[pick]


def depth(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """With the same init and norm, the skip keeps deep sigmoid nets trainable; the init gain sets the backward signal.

    Part 1 (the anchor is He et al.'s figure of training loss against depth): :class:`descend.nn.ResidualMLP`
    of width 64 with He init and pre-LayerNorm blocks, with the skip (``z + W act(norm(z))``) and
    without it (``W act(norm(z))``, the same parameters), ReLU and sigmoid, at several depths, trained
    on digits by Adam (100 steps, minibatches of 64); each net's learning rate is tuned at each depth on
    the mean final validation loss over seeds. Reported: the final training loss against depth (the
    measure of trainability, as in He et al.), and the test loss (test digits never used for a choice).
    Part 2: a plain tanh :class:`descend.nn.MLP` of 16 hidden layers initialised with
    ``W ~ N(0, g^2/fan_in)``, ``g`` in {0.5, 1, sqrt 2, 4}: the norm of the loss gradient at each layer's
    output (:func:`descend.diagnostics.activation_gradients`) at initialisation, 256 digits.
    Part 3: the weight-gradient norm of every layer (:func:`descend.diagnostics.gradient_flow`) of the
    16-block nets of part 1 at initialisation. Part 4: the bare residual ``z + f(z)`` (no norm) against
    the pre-norm one: the size of the output and of the first layer's gradient against depth.
    """
    depths = (2, 8) if quick else (2, 8, 32)
    steps = 100
    n = len(seeds)
    tuned: dict[str, dict[int, Any]] = {}
    train_loss: dict[str, dict[int, list[float]]] = {}
    test_loss: dict[str, dict[int, list[float]]] = {}
    for kind, act in NETS:
        label = f"{kind} {act}"
        tuned[label], train_loss[label], test_loss[label] = {}, {}, {}
        for d in depths:  # every net tuned at every depth: a rate good for 2 layers may be bad for 32
            r = tune(lambda lr, s, k=kind, a=act, d=d: _train(k, a, d, lr, s, steps), [1e-3, 3e-3, 1e-2], seeds, 2)
            tuned[label][d] = r
            train_loss[label][d] = [det["train_loss"] for det in r.details[r.best_lr]]
            test_loss[label][d] = [det["test_loss"] for det in r.details[r.best_lr]]

    # part 2: init gain of a plain tanh net, the backward signal per layer
    signal: dict[float, list[list[float]]] = {}
    for g in GAINS:
        signal[g] = []
        for s in seeds:
            seed_everything(s)
            x, y = _probe(s)
            signal[g].append(list(activation_gradients(MLP(64, 10, WIDTH, 16, "tanh", init=g), x, y,
                                                       nn.functional.cross_entropy).values()))
    # ratio of the first hidden layer's backward signal to the last's
    ratio = {g: [r[0] / r[-1] for r in rows] for g, rows in signal.items()}

    # part 3: weight-gradient norm per layer, 16 blocks, plain vs residual
    flows: dict[str, list[list[float]]] = {}
    for kind, act in NETS:
        flows[f"{kind} {act}"] = []
        for s in seeds:
            seed_everything(s)
            x, y = _probe(s)
            flows[f"{kind} {act}"].append(list(gradient_flow(_net(kind, act, 16), x, y,
                                                             nn.functional.cross_entropy).values()))

    # part 4: the bare residual z + f(z) against the pre-norm residual, at initialisation
    bare_depths = (2, 8, 32, 128, 256) if quick else (2, 8, 32, 64, 128, 192, 256, 320)
    blow: dict[str, dict[str, list[list[float]]]] = {}
    for label, norm in (("bare z + f(z)", None), ("pre-norm residual", "layer")):
        blow[label] = {"output_std": [], "first_grad": []}
        for s in seeds:
            x, y = _probe(s)
            out_row, grad_row = [], []
            for d in bare_depths:
                seed_everything(s)
                model = _net("residual", "relu", d, norm)
                with torch.no_grad():
                    out_row.append(float(model(x).std()))
                grad_row.append(next(iter(gradient_flow(model, x, y, nn.functional.cross_entropy).values())))
            blow[label]["output_std"].append(out_row)
            blow[label]["first_grad"].append(grad_row)
    bare_nan = [next((d for d, v in zip(bare_depths, row) if not math.isfinite(v)), None)
                for row in blow["bare z + f(z)"]["output_std"]]

    deep = depths[-1]
    findings = [
        finding("skip_decisive_for_sigmoid",
                f"at depth {deep}, the residual sigmoid net ends with a lower training loss than the plain one "
                f"({span(train_loss['residual sigmoid'][deep])} against {span(train_loss['plain sigmoid'][deep])})",
                [r < p for r, p in zip(train_loss["residual sigmoid"][deep], train_loss["plain sigmoid"][deep])]),
        finding("skip_sigmoid_test_loss",
                f"and a lower test loss ({span(test_loss['residual sigmoid'][deep])} against "
                f"{span(test_loss['plain sigmoid'][deep])})",
                [r < p for r, p in zip(test_loss["residual sigmoid"][deep], test_loss["plain sigmoid"][deep])]),
        finding("plain_sigmoid_degrades_with_depth",
                f"the plain sigmoid net's training loss is higher at depth {deep} than at depth {depths[0]} "
                f"({span(train_loss['plain sigmoid'][deep])} against {span(train_loss['plain sigmoid'][depths[0]])})",
                [a > b for a, b in zip(train_loss["plain sigmoid"][deep], train_loss["plain sigmoid"][depths[0]])]),
        finding("skip_helps_relu",
                f"at depth {deep}, the residual ReLU net ends with a lower training loss than the plain ReLU net "
                f"({span(train_loss['residual relu'][deep])} against {span(train_loss['plain relu'][deep])})",
                [r < p for r, p in zip(train_loss["residual relu"][deep], train_loss["plain relu"][deep])]),
        finding("gain_below_one_vanishes",
                f"tanh, 16 layers, gain 0.5: the backward signal at the first layer is below 1e-3 of the last "
                f"layer's (ratio {span(ratio[0.5], '.1e')})", [r < 1e-3 for r in ratio[0.5]]),
        finding("gain_above_one_explodes",
                f"tanh, 16 layers, gain 4: the backward signal at the first layer is above 10x the last "
                f"layer's (ratio {span(ratio[4.0], '.1e')})", [r > 10 for r in ratio[4.0]]),
        finding("gain_one_keeps_signal",
                f"tanh, 16 layers, gain 1: first/last ratio within 0.1..10 ({span(ratio[1.0], '.2f')})",
                [0.1 < r < 10 for r in ratio[1.0]]),
        finding("bare_residual_blows_up",
                f"the bare residual's output grows with depth to non-finite values by depth {bare_depths[-1]} "
                f"(first non-finite depth per seed: {', '.join(str(d) for d in bare_nan)}), while the "
                f"pre-norm residual's output std stays within 0.1..10",
                [d is not None and all(0.1 < v < 10 for v in row)
                 for d, row in zip(bare_nan, blow["pre-norm residual"]["output_std"])]),
    ]
    notes = [f"{label}, depth {d}: learning rate {r.best_lr:g}{' (at the grid edge)' if r.at_edge else ''}, final "
             f"training loss {span(train_loss[label][d])}, test loss {span(test_loss[label][d])}"
             for label, by in tuned.items() for d, r in by.items()]
    numbers: dict[str, Any] = {
        "depths": list(depths), "steps": steps, "width": WIDTH,
        "tuning": {label: {str(d): tuned_dict(r) for d, r in by.items()} for label, by in tuned.items()},
        "train_loss": {label: {str(d): v for d, v in by.items()} for label, by in train_loss.items()},
        "test_loss": {label: {str(d): v for d, v in by.items()} for label, by in test_loss.items()},
        "gains": list(GAINS), "backward_signal": {f"{g:.3g}": v for g, v in signal.items()},
        "first_over_last_signal": {f"{g:.3g}": v for g, v in ratio.items()},
        "gradient_flow_depth16": flows, "bare_depths": list(bare_depths), "blow_up": blow,
        "bare_first_nonfinite_depth": bare_nan,
    }

    fig, axes = new_figure(2, width=5.2, height=3.6, nrows=2)
    ax1, ax2, ax3, ax4 = axes
    for (label, by), color in zip(train_loss.items(), PALETTE):
        style = "-" if label.startswith("residual") else "--"
        band(ax1, depths, [[by[d][i] for d in depths] for i in range(n)], color, label, style)
    ax1.set(xscale="log", yscale="log", xlabel="hidden layers (depth)",
            ylabel=f"training loss after {steps} steps", title="same init and norm, skip on/off, lr tuned per depth")
    ax1.set_xticks(list(depths), [str(d) for d in depths])
    ax1.minorticks_off()
    ax1.legend(fontsize=7)
    for g, color in zip(GAINS, PALETTE):
        rows = signal[g]
        band(ax2, range(1, len(rows[0]) + 1), rows, color, f"gain {g:.3g}")
    ax2.set(yscale="log", xlabel="hidden layer (input side → output)", ylabel="‖∂L/∂h_l‖ at initialisation",
            title="plain tanh MLP, 16 layers, W ~ N(0, g²/fan_in)")
    ax2.legend(fontsize=7)
    for (label, rows), color in zip(flows.items(), PALETTE):
        style = "-" if label.startswith("residual") else "--"
        band(ax3, range(len(rows[0])), rows, color, label, style)
    ax3.set(yscale="log", xlabel="layer (stem → blocks → head)", ylabel="‖∂L/∂W‖ at initialisation",
            title="16 blocks, He init, LayerNorm")
    ax3.legend(fontsize=7)
    for (label, parts), color in zip(blow.items(), PALETTE[4:]):
        for rows, style, what in ((parts["output_std"], "-", "output std"), (parts["first_grad"], ":", "‖∂L/∂W₁‖")):
            band(ax4, bare_depths, rows, color, f"{label}: {what}", style)
    nonfinite = sorted({d for d in bare_nan if d is not None})
    for d in nonfinite:
        ax4.axvline(d, color=PALETTE[4], linestyle="--", linewidth=1)
    if nonfinite:  # one label for all the lines: labels at neighbouring depths would overlap
        count = {d: bare_nan.count(d) for d in nonfinite}
        text = "bare: non-finite from depth\n" + ", ".join(f"{d} ({count[d]} of {n} seeds)" for d in nonfinite)
        ax4.annotate(text, (nonfinite[0], 0.5), xycoords=("data", "axes fraction"), xytext=(-8, 0),
                     textcoords="offset points", fontsize=7, color=PALETTE[4], ha="right", va="center",
                     multialignment="right", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax4.set(xscale="log", yscale="log", xlabel="residual blocks (depth)", ylabel="size at initialisation",
            title="ReLU residual, He init: with and without norm")
    ax4.set_xlim(bare_depths[0] / 1.3, bare_depths[-1] * 1.6)
    ticks = [d for d in bare_depths if d & (d - 1) == 0]  # powers of two: labels that do not overlap
    ax4.set_xticks(ticks, [str(d) for d in ticks])
    ax4.minorticks_off()
    ax4.legend(fontsize=7, loc="upper left")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return Outcome(numbers, fig, findings, notes)
