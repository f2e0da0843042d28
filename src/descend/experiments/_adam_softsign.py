"""Adam as an adaptive softsign: its direction, its magnitude ``|m|/sqrt(v)``, and tuned training curves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from descend import optim
from descend._random import seed_everything
from descend.experiments._common import (
    PALETTE,
    Outcome,
    band,
    digits,
    finding,
    flat,
    loss_of,
    new_figure,
    span,
    tune,
    tuned_dict,
)
from descend.nn import MLP
from descend.train import Minibatch

BATCH, WIDTH, DEPTH = 32, 64, 2
B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8
EPSILONS = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2)

#: Method -> optimizer constructor ``(params, lr)``, and its starting learning-rate grid.
METHODS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "Adam": lambda p, lr: optim.Adam(p, lr=lr, betas=(B1, B2), eps=ADAM_EPS),
    "Softsign": lambda p, lr: optim.Softsign(p, lr=lr, beta=B1, eps=ADAM_EPS),
    "Signum": lambda p, lr: optim.Signum(p, lr=lr, beta=B1),
    "Momentum": lambda p, lr: optim.Momentum(p, lr=lr, beta=B1),
}
GRIDS = {"Adam": [1e-3, 3e-3, 1e-2], "Softsign": [3e-4, 1e-3, 3e-3], "Signum": [3e-4, 1e-3, 3e-3],
         "Momentum": [0.1, 0.3, 1.0]}


def _cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _train(method: str, lr: float, seed: int, steps: int) -> tuple[float, dict[str, Any]]:
    """Minibatch training on digits: the final validation loss (the tuning score), the test loss every 10 steps
    and at the end; for Adam, also its moments' diagnostics every 10 steps.

    The diagnostics keep their own moments ``m`` and ``v`` (betas 0.9, 0.999) from the same gradients Adam
    sees, to compare Adam's step (:func:`~descend.optim.scale_by_adam`) with softsign's
    (:func:`~descend.optim.softsign` of ``m``, without bias correction).
    """
    data = digits(seed)
    seed_everything(seed)
    model = MLP(64, 10, WIDTH, DEPTH)
    params = list(model.parameters())
    opt = METHODS[method](params, lr)
    sampler = Minibatch(len(data.y), BATCH, seed=seed)
    probe = method == "Adam"
    m = v = None
    losses = [loss_of(model, data.x_test, data.y_test)]
    diag: dict[str, Any] = {"cos_softsign": {e: [] for e in EPSILONS}, "norm_ratio": {e: [] for e in EPSILONS},
                            "cos_momentum": [], "median_ratio": []}
    for t in range(1, steps + 1):
        (idx,) = sampler.next_step()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
        if probe:
            g = flat([p.grad for p in params])
            m = (1 - B1) * g if m is None else B1 * m + (1 - B1) * g
            v = (1 - B2) * g * g if v is None else B2 * v + (1 - B2) * g * g
            if t % 10 == 0:
                m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
                adam = m_hat / (v_hat.sqrt() + ADAM_EPS)
                diag["median_ratio"].append(float((m_hat.abs() / v_hat.sqrt().clamp_min(1e-30)).median()))
                diag["cos_momentum"].append(_cos(adam, m))
                for e in EPSILONS:
                    soft = m / (m.abs() + e)
                    diag["cos_softsign"][e].append(_cos(adam, soft))
                    diag["norm_ratio"][e].append(float(adam.norm() / soft.norm().clamp_min(1e-300)))
                if t == steps - steps % 10:
                    diag["ratio_final"] = (m_hat.abs() / v_hat.sqrt().clamp_min(1e-30)).float()
        opt.step()
        if t % 10 == 0:
            losses.append(loss_of(model, data.x_test, data.y_test))
            if losses[-1] == float("inf"):
                return float("inf"), {}
    test_final = loss_of(model, data.x_test, data.y_test)
    return loss_of(model, data.x_val, data.y_val), {"loss": losses, "test_final": test_final, **(diag if probe else {})}


def adam_softsign(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """Adam's steps are far shorter than softsign momentum's (``|m|/sqrt(v)`` is well below 1); its direction is nearer
    softsign's with eps 1e-4 than the momentum ``m``, and nearer ``m`` than softsign's with eps 1e-8.

    An MLP 64-64-64-10 (ReLU) on digits, minibatches of 32. Adam (betas 0.9, 0.999, eps 1e-8),
    Softsign (``m/(|m|+eps)``, beta 0.9, eps 1e-8), Signum (``sign(m)``) and EMA momentum (``m``) are
    each run at the learning rate that minimises the mean final validation loss over seeds (a grid
    extended at its edges); their losses are reported on the test digits, never used for a choice.
    Along Adam's run, every 10 steps, from the same gradients: the per-weight ratio ``|m_hat|/sqrt(v_hat)``
    (1 when the gradient's sign is consistent, about ``sqrt(1-beta1)/(1+beta1)``
    ... ``0.2`` when it is noise), the cosine of Adam's step ``m_hat/(sqrt(v_hat)+eps)`` with softsign's
    ``m/(|m|+eps)`` for eps from 1e-8 to 1e-2 and with the momentum ``m`` itself, and the ratio of
    their norms (Adam's length over softsign's).
    """
    steps = 200 if quick else 400
    tuned = {m: tune(lambda lr, s, m=m: _train(m, lr, s, steps), GRIDS[m], seeds, 3) for m in METHODS}
    runs = {m: r.details[r.best_lr] for m, r in tuned.items()}
    adam = runs["Adam"]
    half = lambda c: sum(c[len(c) // 2:]) / len(c[len(c) // 2:])  # noqa: E731
    cos_soft = {e: [half(d["cos_softsign"][e]) for d in adam] for e in EPSILONS}
    ratio = {e: [half(d["norm_ratio"][e]) for d in adam] for e in EPSILONS}
    cos_mom = [half(d["cos_momentum"]) for d in adam]
    median = [d["median_ratio"][-1] for d in adam]
    test = {m: [d["test_final"] for d in r.details[r.best_lr]] for m, r in tuned.items()}

    findings = [
        finding("adam_steps_are_smaller",
                f"at the end of Adam's run the median per-weight |m_hat|/sqrt(v_hat) is {span(median, '.2f')}: "
                "below 0.5, so Adam's steps are shorter than softsign's (|m|/(|m|+eps), about 1)",
                [x < 0.5 for x in median]),
        finding("adam_norm_below_softsign",
                f"Adam's step is shorter than softsign's (eps 1e-8) in norm: ratio {span(ratio[1e-8], '.2f')} "
                "(second half of training)", [r < 1 for r in ratio[1e-8]]),
        finding("momentum_closer_than_softsign",
                f"Adam's direction is closer to the momentum m's (cosine {span(cos_mom, '.3f')}) than to softsign's "
                f"with eps 1e-8 (cosine {span(cos_soft[1e-8], '.3f')})",
                [a > b for a, b in zip(cos_mom, cos_soft[1e-8])]),
        finding("best_eps_is_larger",
                f"softsign with a larger eps (1e-4: cosine {span(cos_soft[1e-4], '.3f')}) is closer to Adam than with "
                "eps 1e-8, and closer than the momentum m",
                [a > b and a > c for a, b, c in zip(cos_soft[1e-4], cos_soft[1e-8], cos_mom)]),
        finding("adam_beats_signum",
                f"at tuned learning rates Adam ends with a lower test loss than Signum "
                f"({span(test['Adam'])} against {span(test['Signum'])})",
                [a < b for a, b in zip(test["Adam"], test["Signum"])]),
        finding("adam_beats_softsign",
                f"at tuned learning rates Adam ends with a lower test loss than Softsign "
                f"({span(test['Adam'])} against {span(test['Softsign'])})",
                [a < b for a, b in zip(test["Adam"], test["Softsign"])]),
    ]
    notes = [f"{m}: tuned lr {r.best_lr:g}{' (at the grid edge)' if r.at_edge else ''}, validation loss "
             f"{span(r.scores[r.best_lr])}, test loss {span(test[m])}" for m, r in tuned.items()]
    notes += [f"softsign eps {e:g}: cosine with Adam {span(cos_soft[e], '.3f')}, "
              f"Adam/softsign norm {span(ratio[e], '.3f')}"
              for e in EPSILONS]
    numbers: dict[str, Any] = {
        "steps": steps, "batch": BATCH, "tuning": {m: tuned_dict(r) for m, r in tuned.items()},
        "test_loss": test, "epsilons": list(EPSILONS),
        "cosine_softsign": {f"{e:g}": v for e, v in cos_soft.items()}, "cosine_momentum": cos_mom,
        "norm_ratio": {f"{e:g}": v for e, v in ratio.items()}, "median_m_over_sqrt_v": median,
    }

    fig, (ax1, ax2, ax3, ax4) = new_figure(4, width=3.9, height=3.5)
    zeros = 0
    for d, color in zip(adam, PALETTE):
        r = d["ratio_final"]
        zeros += int((r < 1e-6).sum())
        ax1.hist(r[r >= 1e-6].log10().tolist(), bins=60, histtype="step", color=color)
    ax1.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax1.set(xlabel="log10 |m̂|/√v̂ per weight (dashed: 1, softsign's size)", ylabel="weights (one line per seed)",
            title=f"Adam's per-weight step size, step {steps}"
            + (f"\n({zeros} weights below 1e-6 left out)" if zeros else ""))
    eps_x = list(EPSILONS)
    band(ax2, eps_x, [[cos_soft[e][i] for e in EPSILONS] for i in range(len(seeds))], PALETTE[0],
         "cos(Adam, softsign(eps))")
    ax2.axhline(sum(cos_mom) / len(cos_mom), color=PALETTE[1], linestyle=":", label="cos(Adam, momentum m)")
    band(ax2, eps_x, [[ratio[e][i] for e in EPSILONS] for i in range(len(seeds))], PALETTE[2],
         "‖Adam step‖ / ‖softsign step‖", "--")
    ax2.set(xscale="log", xlabel="softsign eps", ylabel="cosine / norm ratio",
            ylim=(0, max(1.05, 1.1 * max(max(v) for v in ratio.values()))),
            title="same gradients, second half of Adam's run")
    ax2.legend(fontsize=7, loc="upper left")
    x = [10 * (i + 1) for i in range(len(adam[0]["median_ratio"]))]
    band(ax3, x, [d["median_ratio"] for d in adam], PALETTE[0], "median |m̂|/√v̂")
    band(ax3, x, [d["cos_softsign"][1e-8] for d in adam], PALETTE[1], "cos(Adam, softsign eps 1e-8)")
    ax3.set(xlabel="step along Adam's run", ylabel="ratio / cosine", ylim=(0, 1.05), title="over training")
    ax3.legend(fontsize=7)
    for (m, rows), color in zip(runs.items(), PALETTE):
        band(ax4, [10 * i for i in range(len(rows[0]["loss"]))], [d["loss"] for d in rows], color,
             f"{m} (lr {tuned[m].best_lr:g})")
    ax4.set(yscale="log", xlabel="step (minibatch 32)", ylabel="test loss (cross-entropy)",
            title="each at its learning rate\ntuned on validation")
    ax4.legend(fontsize=7)
    for ax in (ax1, ax2, ax3, ax4):
        ax.grid(True, alpha=0.3)
    return Outcome(numbers, fig, findings, notes)
