"""Full-batch gradient descent against minibatch SGD, counted in examples touched and in seconds."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from descend import optim
from descend.experiments._common import Outcome, digits, loss_of, minibatches, new_figure, seed_all
from descend.nn import MLP


def _train(x: torch.Tensor, y: torch.Tensor, batch: int | None, lr: float, budget: int, seed: int,
           target: float | None = None) -> dict[str, Any]:
    """A one-hidden-layer MLP trained by descend's SGD; full-batch when ``batch`` is None.

    Records the full training loss against examples touched (one gradient evaluation of one example
    each) and against training wall time (the loss evaluations themselves are not timed). Stops at
    ``budget`` examples or once the training loss is at or below ``target``.
    """
    n = len(y)
    gen = seed_all(seed)
    model = MLP(x.shape[1], 10, hidden=32, depth=1)
    opt = optim.SGD(model.parameters(), lr=lr)
    size = n if batch is None else batch
    batches = minibatches(n, size, gen) if batch is not None else None
    checkpoints = torch.unique(torch.logspace(0, torch.log10(torch.tensor(float(budget))), 80).long()).tolist()
    touched, seconds, k = 0, 0.0, 0
    examples, times, losses = [0], [0.0], [loss_of(model, x, y)]
    while touched < budget:
        t0 = time.perf_counter()
        idx = next(batches) if batches is not None else slice(None)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        seconds += time.perf_counter() - t0
        touched += size
        if batch is None or touched >= checkpoints[min(k, len(checkpoints) - 1)] or touched >= budget:
            while k < len(checkpoints) and checkpoints[k] <= touched:
                k += 1
            examples.append(touched)
            times.append(seconds)
            losses.append(loss_of(model, x, y))
            if target is not None and losses[-1] <= target:
                break
    return {"batch": batch, "lr": lr, "examples": examples, "seconds": times, "loss": losses}


def _first_reach(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    for e, s, loss in zip(run["examples"], run["seconds"], run["loss"]):
        if loss <= target:
            return e, s
    return None, None


def gd_vs_sgd(*, quick: bool = False, seed: int = 0) -> Outcome:
    """SGD reaches full-batch GD's final loss after touching fewer examples.

    A one-hidden-layer MLP (``descend.nn.MLP(64, 10, hidden=32, depth=1)``, cross-entropy) on the
    standardised digits training set (1258 examples), trained by :class:`descend.optim.SGD` with no momentum. Full-batch
    GD runs ``T`` steps (``T * 1078`` examples touched) at the best learning rate of ``{1, 3, 10}``;
    its final training loss is the target. Minibatch SGD with batch 256, 32 and 1 (fixed learning
    rates 1.0, 0.3, 0.03, reshuffled each epoch) runs until its full training loss reaches that target
    or it has touched as many examples as GD (batch 1: a quarter of that). The numbers: examples and
    seconds each method needs to reach GD's final loss, and their ratio to GD's. Wall time tells the
    other half: batch 1 touches the fewest examples but, one tiny step at a time, takes the longest.
    """
    x, y, _, _ = digits(seed)
    n = len(y)
    steps = 40 if quick else 100
    budget = steps * n
    gd_runs = [_train(x, y, None, lr, budget, seed) for lr in (1.0, 3.0, 10.0)]
    gd = min(gd_runs, key=lambda r: r["loss"][-1] if r["loss"][-1] == r["loss"][-1] else float("inf"))
    target = gd["loss"][-1]
    runs: dict[str, dict[str, Any]] = {"GD (full batch)": gd}
    for batch, lr in ((256, 1.0), (32, 0.3), (1, 0.03)):
        cap = budget // 4 if batch == 1 else budget
        runs[f"SGD batch {batch}"] = _train(x, y, batch, lr, cap, seed, target=target)
    numbers: dict[str, Any] = {"train_examples": n, "gd_steps": steps, "gd_lr": gd["lr"],
                               "gd_final_loss": target, "gd_examples": budget, "gd_seconds": gd["seconds"][-1],
                               "reach": {}, "runs": runs}
    finding = [f"full-batch GD, lr {gd['lr']:g}, {steps} steps: loss {target:.4f} after {budget} examples "
               f"({gd['seconds'][-1]:.2f} s)"]
    for label, r in runs.items():
        if label.startswith("GD"):
            continue
        e, s = _first_reach(r, target)
        numbers["reach"][label] = {"examples": e, "seconds": s,
                                   "fraction_of_gd_examples": None if e is None else e / budget}
        finding.append(f"{label} (lr {r['lr']:g}): " + ("did not reach it" if e is None else
                       f"reached it after {e} examples = {e / budget:.3f} of GD's ({s:.2f} s)"))

    fig, (ax1, ax2) = new_figure(2)
    for label, r in runs.items():
        ex = [max(e, 1) for e in r["examples"]]
        ax1.plot(ex, r["loss"], label=label)
        ax2.plot([max(s, 1e-4) for s in r["seconds"]], r["loss"], label=label)
    for ax, xlabel in ((ax1, "examples touched (gradient evaluations)"), (ax2, "training wall time (s)")):
        ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (cross-entropy)")
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("MLP 64-32-10 on digits, SGD")
    ax2.set_title("dotted: GD's final loss")
    return Outcome(numbers, fig, finding)
