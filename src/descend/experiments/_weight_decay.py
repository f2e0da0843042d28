"""Weight decay: a decay sweep on an overfitting net, and the box ``|w| <= 1/lambda`` of decoupled decay."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from matplotlib.ticker import NullFormatter
from torch import nn

from descend import optim
from descend._random import generator, seed_everything
from descend.experiments._common import (
    PALETTE,
    Outcome,
    accuracy,
    band,
    digits,
    finding,
    loss_of,
    new_figure,
    span,
    tune,
    tuned_dict,
)
from descend.nn import MLP
from descend.train import Minibatch

FEW = 150  # training examples of the overfitting task
BOX_LAMBDA = 5.0  # bound 1/lambda = 0.2
AT_BOUND = 0.95  # |w| >= 0.95/lambda counts as at the bound

#: Method -> optimizer with decoupled decay ``w <- w - lr*lambda*w``. SGD is not among them: with decoupled
#: lambda = 5 it does not train at any learning rate (a rate large enough to move the weights decays them away).
BOX_METHODS: dict[str, Callable[[Any, float, float], torch.optim.Optimizer]] = {
    "Lion": lambda p, lr, wd: optim.Lion(p, lr=lr, weight_decay=wd),
    "Signum": lambda p, lr, wd: optim.Signum(p, lr=lr, weight_decay=wd),
    "AdamW": lambda p, lr, wd: optim.AdamW(p, lr=lr, weight_decay=wd),
}
BOX_GRIDS = {"Lion": [3e-4, 1e-3, 3e-3], "Signum": [3e-4, 1e-3, 3e-3], "AdamW": [3e-4, 1e-3, 3e-3]}


def _few(seed: int) -> tuple[torch.Tensor, ...]:
    data = digits(seed)
    pick = torch.randperm(len(data.y), generator=generator(seed + 7))[:FEW]
    return data.x[pick], data.y[pick], data.x_val, data.y_val, data.x_test, data.y_test


def _overfit(lam: float, lr: float, seed: int, steps: int) -> tuple[float, dict[str, float]]:
    """Full-batch AdamW (decay ``lam``) on 150 digits, MLP 64-256-256-10: validation loss (the tuning score),
    train and test losses."""
    x, y, xv, yv, xt, yt = _few(seed)
    seed_everything(seed)
    model = MLP(64, 10, 256, 2)
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=lam)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return loss_of(model, xv, yv), {"train_loss": loss_of(model, x, y), "test_loss": loss_of(model, xt, yt)}


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for name, p in model.named_parameters() if p.dim() >= 2])


def _box(method: str, lr: float, seed: int, steps: int) -> tuple[float, dict[str, Any]]:
    """Minibatch (64) training of an MLP 64-64-10 on digits with decoupled decay lambda = 5.

    Returns the validation loss (the tuning score) and, every 10 steps, ``max|w| * lambda`` and the share of
    weight-matrix entries with ``|w| >= 0.95/lambda``; the final weights, test loss and test accuracy too.
    """
    data = digits(seed)
    seed_everything(seed)
    model = MLP(64, 10, 64, 1)
    opt = BOX_METHODS[method](model.parameters(), lr, BOX_LAMBDA)
    sampler = Minibatch(len(data.y), 64, seed=seed)
    w = _weights(model)
    max_abs, at_bound = [float(w.abs().max()) * BOX_LAMBDA], [float((w.abs() >= AT_BOUND / BOX_LAMBDA).double().mean())]
    for t in range(1, steps + 1):
        (idx,) = sampler.next_step()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
        opt.step()
        if t % 10 == 0:
            w = _weights(model)
            max_abs.append(float(w.abs().max()) * BOX_LAMBDA)
            at_bound.append(float((w.abs() >= AT_BOUND / BOX_LAMBDA).double().mean()))
    return loss_of(model, data.x_val, data.y_val), {
        "max_abs_times_lambda": max_abs, "fraction_at_bound": at_bound, "weights": _weights(model),
        "test_loss": loss_of(model, data.x_test, data.y_test),
        "test_accuracy": accuracy(model, (data.x_test,), data.y_test)}


def weight_decay(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """On an overfitting net decay moves the test loss little until it is too strong, then it hurts a lot; for sign
    methods decoupled decay is the box ``|w| <= 1/lambda``.

    Part 1: an MLP 64-256-256-10 fitted full-batch by AdamW to 150 digits, for decoupled decay lambda
    from 0 to 100, its learning rate tuned at each lambda on the mean final validation loss; lambda is
    chosen on the validation loss too, and the test loss (on the 359 test digits, never used for a choice) is
    reported against lambda. Part 2: an MLP 64-64-10 trained on all training digits (minibatches of
    64) with the same decoupled decay ``w <- w - lr*lambda*w``, lambda = 5 (bound ``1/lambda = 0.2``),
    by Lion, Signum and AdamW, each at its learning rate tuned on the mean validation loss (SGD is left
    out: at this decay it stays at chance at every learning rate). A sign method moves each weight by
    at most ``lr (1 + lambda |w|)`` per step and ``|w| = 1/lambda`` is where decay cancels a full sign
    step, so ``||w||_inf <= 1/lambda`` emerges from plain training; reported: ``max|w|*lambda`` and the
    share of weights at ``|w| >= 0.95/lambda`` over training, the final weight histograms, and the test
    accuracy.
    """
    n = len(seeds)
    steps = 200 if quick else 300
    lams = (0.0, 1.0, 10.0, 100.0) if quick else (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)
    lr_tune = {lam: tune(lambda lr, s, lam=lam: _overfit(lam, lr, s, steps), [1e-4, 3e-4, 1e-3], seeds, 3)
               for lam in lams}
    sweep = {lam: r.details[r.best_lr] for lam, r in lr_tune.items()}
    val = {lam: r.scores[r.best_lr] for lam, r in lr_tune.items()}
    test = {lam: [d["test_loss"] for d in runs] for lam, runs in sweep.items()}
    train = {lam: [d["train_loss"] for d in runs] for lam, runs in sweep.items()}
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    best_lam = min(lams, key=lambda lam: mean(val[lam]))
    gain = [100 * (1 - b / a) for a, b in zip(test[0.0], test[best_lam])]

    box_steps = 200 if quick else 400
    box = {m: tune(lambda lr, s, m=m: _box(m, lr, s, box_steps), BOX_GRIDS[m], seeds, 3) for m in BOX_METHODS}
    box_runs = {m: r.details[r.best_lr] for m, r in box.items()}
    final_frac = {m: [d["fraction_at_bound"][-1] for d in runs] for m, runs in box_runs.items()}
    final_max = {m: [d["max_abs_times_lambda"][-1] for d in runs] for m, runs in box_runs.items()}
    box_acc = {m: [d["test_accuracy"] for d in runs] for m, runs in box_runs.items()}

    findings = [
        finding("best_decay_small_effect",
                f"the decay chosen on validation loss (lambda = {best_lam:g}) changes the test loss by under 10% "
                f"against no decay ({span(test[best_lam])} against {span(test[0.0])}: {span(gain, '.1f')}% lower, "
                f"lower on {sum(g > 0 for g in gain)} of {n} seeds)",
                [abs(g) < 10 for g in gain]),
        finding("too_much_decay_hurts",
                f"too much decay hurts: the test loss at lambda = {lams[-1]:g} ({span(test[lams[-1]])}) is above the "
                f"one at lambda = {best_lam:g}", [a > b for a, b in zip(test[lams[-1]], test[best_lam])]),
    ]
    for m in ("Lion", "Signum"):
        findings.append(finding(
            f"{m.lower()}_in_the_box",
            f"{m} with decoupled lambda = {BOX_LAMBDA:g} keeps max|w| <= (1/lambda)(1 + lr*lambda) throughout "
            f"(final max|w|*lambda {span(final_max[m], '.3f')}); {span([100 * f for f in final_frac[m]], '.1f')}% of "
            f"weights end at |w| >= 0.95/lambda",
            [all(v <= 1 + box[m].best_lr * BOX_LAMBDA + 1e-6 for v in d["max_abs_times_lambda"]) for d in box_runs[m]]))
    findings += [
        finding("box_methods_train",
                "at lambda = 5 all three train: test accuracy "
                + ", ".join(f"{m} {span([100 * a for a in box_acc[m]], '.1f')}%" for m in BOX_METHODS)
                + " (chance 10%), each above 80%",
                [all(box_acc[m][i] > 0.8 for m in BOX_METHODS) for i in range(n)]),
        finding("sign_methods_fill_the_box",
                f"more weights end at the bound with Lion ({span([100 * f for f in final_frac['Lion']], '.1f')}%) and "
                f"Signum ({span([100 * f for f in final_frac['Signum']], '.1f')}%) than with AdamW at the same decay "
                f"({span([100 * f for f in final_frac['AdamW']], '.2f')}%), whose largest weight is "
                f"{span(final_max['AdamW'], '.2f')}/lambda",
                [a > c and b > c for a, b, c in zip(final_frac["Lion"], final_frac["Signum"], final_frac["AdamW"])]),
    ]
    notes = [f"lambda = {lam:g}: AdamW lr {r.best_lr:g}{' (at the grid edge)' if r.at_edge else ''}, train "
             f"{span(train[lam])}, validation {span(val[lam])}, test {span(test[lam])}" for lam, r in lr_tune.items()]
    notes += [f"{m}: tuned lr {r.best_lr:g}{' (at the grid edge)' if r.at_edge else ''}, validation loss "
              f"{span(r.scores[r.best_lr])}, test accuracy {span([100 * a for a in box_acc[m]], '.1f')}%, final "
              f"max|w|*lambda {span(final_max[m], '.3f')}, at the bound "
              f"{span([100 * f for f in final_frac[m]], '.2f')}%"
              for m, r in box.items()]
    numbers: dict[str, Any] = {
        "lambdas": list(lams), "steps": steps, "lr_tuning": {str(k): tuned_dict(r) for k, r in lr_tune.items()},
        "best_lambda": best_lam, "val_loss": {str(k): v for k, v in val.items()},
        "test_loss": {str(k): v for k, v in test.items()}, "train_loss": {str(k): v for k, v in train.items()},
        "box_lambda": BOX_LAMBDA, "box_steps": box_steps,
        "box": {m: {"tuning": tuned_dict(r), "final_fraction_at_bound": final_frac[m],
                    "final_max_abs_times_lambda": final_max[m], "test_accuracy": box_acc[m]} for m, r in box.items()},
    }

    fig, axes = new_figure(3, width=4.3, height=3.4, nrows=2)
    ax = axes[0]
    pos = lams[1:]
    curves = ((test, PALETTE[0], "test"), (val, PALETTE[1], "validation"), (train, PALETTE[2], "train"))
    for data, color, label in curves:
        band(ax, pos, [[data[lam][i] for lam in pos] for i in range(n)], color, label)
        ax.axhline(mean(data[0.0]), color=color, linestyle=":", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="decoupled decay λ (AdamW, lr tuned per λ)",
           ylabel="loss (cross-entropy)", title="150 digits, MLP 64-256-256-10\n(dotted: λ = 0)")
    ax.legend(fontsize=7, loc="lower right")
    x = [10 * i for i in range(len(box_runs["Lion"][0]["fraction_at_bound"]))]
    for (m, runs), color in zip(box_runs.items(), PALETTE):
        band(axes[1], x, [[100 * f for f in d["fraction_at_bound"]] for d in runs], color,
             f"{m} (lr {box[m].best_lr:g})")
        band(axes[2], x, [d["max_abs_times_lambda"] for d in runs], color, m)
    axes[1].set(xlabel="step (minibatch 64)", ylabel="% of weights with |w| ≥ 0.95/λ",
                title=f"decoupled decay λ = {BOX_LAMBDA:g}")
    axes[1].legend(fontsize=7)
    axes[2].axhline(1.0, color="gray", linestyle="--", linewidth=1, label="1/λ")
    axes[2].set(xlabel="step (minibatch 64)", ylabel="max|w| · λ", title="the largest weight")
    axes[2].legend(fontsize=7)
    edges = torch.linspace(-1.5 / BOX_LAMBDA, 1.5 / BOX_LAMBDA, 61)
    for ax, (m, runs), color in zip(axes[3:], box_runs.items(), PALETTE):
        w = torch.cat([d["weights"] for d in runs])
        outside = int(((w < edges[0]) | (w > edges[-1])).sum())
        ax.hist(w.clamp(float(edges[0]), float(edges[-1])).tolist(), bins=edges.tolist(), color=color)
        for side in (-1, 1):
            ax.axvline(side / BOX_LAMBDA, color="black", linestyle="--", linewidth=1)
        ax.set(yscale="log", xlabel="weight value (dashed: ±1/λ)", ylabel="count (all seeds)",
               title=f"{m}: final weights" + (f"\n({outside} beyond ±0.3 piled at the ends)" if outside else ""))
    for a in axes:
        a.grid(True, alpha=0.3)
        a.yaxis.set_minor_formatter(NullFormatter())  # log axes spanning under a decade label only their decades
    return Outcome(numbers, fig, findings, notes)
