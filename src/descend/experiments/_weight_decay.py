"""Weight decay: L2 in the loss, coupled and decoupled decay on an overfitting net; decay as a box constraint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from descend import optim
from descend.experiments._common import Outcome, accuracy, digits, loss_of, new_figure, seed_all
from descend.nn import MLP

LR = 1e-3
L2 = 1e-3  # L2 in the loss and coupled decay (the same gradient g + lambda*w)
DECOUPLED = 1.0  # AdamW's lambda: w <- (1 - lr*lambda) w each step
BOX_LAMBDA = 5.0  # Lion/Signum: |w| <= 1/lambda = 0.2
BOX_LR = 3e-3


def _overfit(kind: str, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
             steps: int, seed: int) -> dict[str, Any]:
    """Full-batch Adam on a few examples with a wide MLP; ``kind`` picks the regularisation."""
    seed_all(seed)
    model = MLP(x.shape[1], 10, hidden=256, depth=2)
    params = list(model.parameters())
    if kind == "decoupled decay":
        opt: torch.optim.Optimizer = optim.AdamW(params, lr=LR, weight_decay=DECOUPLED)
    elif kind == "coupled decay":
        opt = optim.Adam(params, lr=LR, weight_decay=L2)
    else:
        opt = optim.Adam(params, lr=LR)
    curve: dict[str, list[float]] = {"step": [], "train_loss": [], "test_loss": []}
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if kind == "L2 in the loss":
            loss = loss + L2 / 2 * sum((p * p).sum() for p in params)
        loss.backward()
        opt.step()
        if t % 10 == 0:
            curve["step"].append(t)
            curve["train_loss"].append(loss_of(model, x, y))
            curve["test_loss"].append(loss_of(model, x_test, y_test))
    train_acc, test_acc = accuracy(model, (x,), y), accuracy(model, (x_test,), y_test)
    return {"train_loss": curve["train_loss"][-1], "test_loss": curve["test_loss"][-1],
            "loss_gap": curve["test_loss"][-1] - curve["train_loss"][-1],
            "train_accuracy": train_acc, "test_accuracy": test_acc, "accuracy_gap": train_acc - test_acc,
            "weight_norm": float(torch.sqrt(sum((p.detach() ** 2).sum() for p in params))), "curve": curve}


def _box(name: str, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> dict[str, Any]:
    """Lion or Signum with decoupled decay ``lambda``, some weights started at ``3/lambda``; max|w| per step."""
    gen = seed_all(seed)
    model = MLP(x.shape[1], 10, hidden=256, depth=2)
    with torch.no_grad():  # push 1% of the first layer's weights far outside the box |w| <= 1/lambda
        w = model.blocks[0].linear.weight
        outside = torch.rand(w.shape, generator=gen) < 0.01
        w[outside] = 3.0 / BOX_LAMBDA * torch.sign(torch.randn(int(outside.sum()), generator=gen))
    cls = optim.Lion if name == "Lion" else optim.Signum
    opt = cls(model.parameters(), lr=BOX_LR, weight_decay=BOX_LAMBDA)  # decoupled by default
    state = optim.constraint_state(opt)[0]
    max_abs, fraction = [state["max_abs_weight"]], [state["fraction_at_bound"]]
    losses = [loss_of(model, x, y)]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        state = optim.constraint_state(opt)[0]
        max_abs.append(state["max_abs_weight"])
        fraction.append(state["fraction_at_bound"])
        losses.append(loss_of(model, x, y))
    return {"radius": state["radius"], "max_abs_weight": max_abs, "fraction_at_bound": fraction, "loss": losses,
            "final_max_abs_weight": max_abs[-1], "bound_plus_lr": 1.0 / BOX_LAMBDA + BOX_LR}


def weight_decay(*, quick: bool = False, seed: int = 0) -> Outcome:
    """Decay shrinks the train/test loss gap; for sign methods decoupled decay is the box ``|w| <= 1/lambda``.

    Part 1: a wide MLP (64-256-256-10) fitted full-batch by Adam (lr 1e-3) to 150 digits, tested
    on 719, with no decay, L2 in the loss (``lambda/2 ||w||^2``, lambda 1e-3), coupled decay
    (``Adam(weight_decay=1e-3)``: the same gradient ``g + lambda w``, so the same run to rounding) and
    decoupled decay (``AdamW(weight_decay=1)``); reported: train and test loss and accuracy, and gaps.
    Part 2: Lion and Signum (lr 3e-3) with decoupled decay lambda = 5 on the same task, 1% of the
    first layer's weights started at ``|w| = 3/lambda``; ``max|w|`` (from
    :func:`descend.optim.constraint_state`) per step against the radius ``1/lambda``: every step
    ``|w| - 1/lambda`` shrinks by ``(1 - lr lambda)`` while outside, and never leaves once inside.
    """
    x_all, y_all, x_test, y_test = digits(seed)
    pick = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed + 7))[:150]
    x, y = x_all[pick], y_all[pick]
    steps = 250 if quick else 400
    kinds = ("no decay", "L2 in the loss", "coupled decay", "decoupled decay")
    runs = {kind: _overfit(kind, x, y, x_test, y_test, steps, seed) for kind in kinds}
    box_steps = 500  # (1 - lr lambda)^500 < 1e-3: the excess 0.4 is then below lr
    boxes = {name: _box(name, x, y, box_steps, seed) for name in ("Lion", "Signum")}

    numbers: dict[str, Any] = {
        "train_examples": len(y), "test_examples": len(y_test), "steps": steps, "lr": LR, "l2": L2,
        "decoupled": DECOUPLED,
        "overfit": {k: {key: v for key, v in r.items() if key != "curve"} for k, r in runs.items()},
        "l2_vs_coupled_max_loss_difference": max(
            abs(a - b) for a, b in zip(runs["L2 in the loss"]["curve"]["test_loss"],
                                       runs["coupled decay"]["curve"]["test_loss"])),
        "box": {name: {"lambda": BOX_LAMBDA, "lr": BOX_LR, "radius": b["radius"],
                       "initial_max_abs_weight": b["max_abs_weight"][0],
                       "final_max_abs_weight": b["final_max_abs_weight"], "bound_plus_lr": b["bound_plus_lr"],
                       "final_fraction_at_bound": b["fraction_at_bound"][-1], "final_loss": b["loss"][-1]}
                for name, b in boxes.items()},
        "curves": {"overfit": {k: r["curve"] for k, r in runs.items()},
                   "box_max_abs_weight": {n: b["max_abs_weight"] for n, b in boxes.items()}},
    }
    finding = [f"{k:>15}: train loss {r['train_loss']:.4f}, test loss {r['test_loss']:.3f} (gap {r['loss_gap']:.3f}); "
               f"accuracy train {r['train_accuracy']:.3f} test {r['test_accuracy']:.3f}" for k, r in runs.items()]
    finding.append(f"L2 in the loss vs coupled decay: largest test-loss difference "
                   f"{numbers['l2_vs_coupled_max_loss_difference']:.1e}")
    finding += [f"{n} with decoupled lambda {BOX_LAMBDA:g}: max|w| {b['max_abs_weight'][0]:.3f} -> "
                f"{b['final_max_abs_weight']:.4f} after {box_steps} steps (1/lambda + lr = {b['bound_plus_lr']:.4f})"
                for n, b in boxes.items()]

    fig, (ax1, ax2) = new_figure(2, width=4.6)
    for k, r in runs.items():
        line = ax1.plot(r["curve"]["step"], r["curve"]["test_loss"], label=f"{k}: test")[0]
        ax1.plot(r["curve"]["step"], r["curve"]["train_loss"], color=line.get_color(), linestyle=":", linewidth=1)
    ax1.set(yscale="log", xlabel="full-batch Adam step", ylabel="loss (dotted: train)",
            title="150 training digits, MLP 64-256-256-10")
    ax1.legend(fontsize=7)
    for n, b in boxes.items():
        ax2.plot(b["max_abs_weight"], label=f"{n}, λ = {BOX_LAMBDA:g}")
    ax2.axhline(1.0 / BOX_LAMBDA, color="gray", linestyle="--", linewidth=1, label="1/λ")
    ax2.set(xlabel="step", ylabel="max |w|", title="decoupled decay as a box constraint")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    return Outcome(numbers, fig, finding)
