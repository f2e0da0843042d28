"""Momentum: acceleration on ill-conditioned quadratics, a larger stable step, and noise smoothing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from descend import optim
from descend._random import generator, seed_everything
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

DIM = 50
TOL = 1e-3
BETAS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.94, 0.96, 0.98, 0.99, 0.995)
SMOOTH_BETAS = (0.0, 0.9, 0.99)
TUNE_OFFSET = 1000  # quadratics for tuning are drawn with seed + 1000, never the reported ones


def quadratic(kappa: float, seed: int, dim: int = DIM) -> tuple[Tensor, Tensor]:
    """Curvatures ``h`` (``h_min = 1/kappa``, ``h_max = 1``, the rest log-uniform between) and a start ``w0 ~ N(0, I)``.

    ``f(w) = 1/2 sum_i h_i w_i^2``: condition number ``kappa``, minimum at 0. Float64, shape ``[dim]`` each.
    """
    g = generator(seed)
    inner = torch.rand(dim - 2, generator=g, dtype=torch.float64)
    h = torch.cat([torch.tensor([1.0 / kappa, 1.0], dtype=torch.float64), kappa ** (inner - 1)])
    return h, torch.randn(dim, generator=g, dtype=torch.float64)


def heavy_ball(h: Tensor, w0: Tensor, alpha: Tensor, beta: Tensor, max_iter: int, tol: float = TOL) -> Tensor:
    """Iterations until ``||w_t|| <= tol ||w_0||`` on ``f = 1/2 sum h_i w_i^2``, for many runs at once.

    The update is :class:`descend.optim.Momentum`'s (:func:`descend.optim.ema` of the gradient), written
    with the heavy-ball step ``alpha = lr (1 - beta)``: ``v <- beta v + alpha g``, ``w <- w - v``
    (``beta = 0`` is gradient descent with step ``alpha``). ``h, w0``: ``[S, d]`` (one quadratic per seed);
    ``alpha, beta``: ``[C]`` (configurations). Returns ``[C, S]`` float iteration counts, ``inf`` where
    the tolerance was not reached within ``max_iter`` or the run diverged (``||w_t|| > 1e6 ||w_0||``).
    """
    a, b = alpha[:, None, None], beta[:, None, None]
    w = w0.expand(len(alpha), *w0.shape).clone()
    v = torch.zeros_like(w)
    start = w0.norm(dim=-1)
    done = torch.full(w.shape[:2], math.inf, dtype=torch.float64)
    active = torch.ones(w.shape[:2], dtype=torch.bool)
    for t in range(1, max_iter + 1):
        v.mul_(b).add_(a * h * w)
        w.sub_(v)
        if t <= 1000 or t % 10 == 0:
            norm = w.norm(dim=-1)
            reached = active & (norm <= tol * start)
            done[reached] = t
            active &= ~reached & (norm < 1e6 * start) & torch.isfinite(norm)
            if not active.any():
                break
    return done


def _tune_quadratic(kappa: float, seeds: Sequence[int], betas: Sequence[float], max_iter: int) -> dict[str, Any]:
    """Per beta, the step alpha minimising the mean iterations to tolerance over seeds (grid extended at edges)."""
    hs, w0s = zip(*(quadratic(kappa, s) for s in seeds))
    h, w0 = torch.stack(hs), torch.stack(w0s)
    grid = [0.3, 0.53, 0.95, 1.69, 3.0]
    cache: dict[tuple[float, float], list[float]] = {}

    def simulate(pairs: list[tuple[float, float]]) -> None:
        alpha = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
        beta = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
        counts = heavy_ball(h, w0, alpha, beta, max_iter)
        for pair, row in zip(pairs, counts.tolist()):
            cache[pair] = row

    simulate([(a, b) for b in betas for a in grid])
    results = {}
    for b in betas:
        def run(alpha: float, seed: int, b: float = b) -> float:
            if (alpha, b) not in cache:
                simulate([(alpha, b)])
            return cache[(alpha, b)][list(seeds).index(seed)]

        results[b] = tune(run, grid, seeds, max_extensions=4)
    best_beta = min(results, key=lambda b: results[b].mean_score(results[b].best_lr))
    return {"per_beta": results, "best_beta": best_beta}


def max_stable_step(beta: float, kappa: float, seed: int, iters: int = 400) -> float:
    """The largest heavy-ball step ``alpha`` (of a fine log grid) after which ``||w_T|| <= ||w_0||``."""
    h, w0 = quadratic(kappa, seed)
    alphas = torch.logspace(math.log10(0.5), math.log10(20.0), 200, dtype=torch.float64)
    w = w0.expand(len(alphas), -1).clone()
    v = torch.zeros_like(w)
    a = alphas[:, None]
    for _ in range(iters):
        v.mul_(beta).add_(a * h * w)
        w.sub_(v)
    stable = torch.isfinite(w.norm(dim=-1)) & (w.norm(dim=-1) <= w0.norm())
    return float(alphas[stable].max()) if stable.any() else math.nan


def _smoothing_run(beta: float, lr: float, seed: int, steps: int) -> tuple[float, dict[str, Any]]:
    """Minibatch (32) training with ``Momentum(beta)`` on digits: final validation loss (the tuning score);
    the test loss every 10 steps and at the end; the cosine between each 10th update ``w_t - w_{t+1}``
    and the full-batch training gradient at ``w_t``."""
    data = digits(seed)
    seed_everything(seed)
    model = MLP(64, 10, 32, 1)
    params = list(model.parameters())
    opt = optim.Momentum(params, lr=lr, beta=beta)
    sampler = Minibatch(len(data.y), 32, seed=seed)
    cosines, losses = [], [loss_of(model, data.x_test, data.y_test)]
    for t in range(1, steps + 1):
        (idx,) = sampler.next_step()
        full = None
        if t % 10 == 0:
            full = flat(torch.autograd.grad(nn.functional.cross_entropy(model(data.x), data.y), params))
            before = flat(params)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
        opt.step()
        if full is not None:
            u = before - flat(params)
            cosines.append(float(u @ full / (u.norm() * full.norm()).clamp_min(1e-300)))
            losses.append(loss_of(model, data.x_test, data.y_test))
            if not math.isfinite(losses[-1]):
                return math.inf, {}
    return loss_of(model, data.x_val, data.y_val), {"cosine": cosines, "test_loss": losses,
                                                    "test_final": loss_of(model, data.x_test, data.y_test)}


def momentum(*, quick: bool = False, seeds: Sequence[int] = (0, 1)) -> Outcome:
    """Momentum accelerates on ill-conditioned quadratics and tolerates a larger step; on a small digits net it
    smooths the update but gives no consistent gain in test loss.

    Part 1, acceleration: ``f(w) = 1/2 sum_i h_i w_i^2`` in 50 dimensions, curvatures from ``1/kappa``
    to 1 (log-uniform between, drawn per seed), start ``w0 ~ N(0, I)``. Gradient descent and EMA momentum
    (:class:`descend.optim.Momentum`, written as the heavy ball ``v <- beta v + alpha g, w <- w - v``
    with ``alpha = lr (1 - beta)``) are tuned for the fewest iterations to ``||w|| <= 1e-3 ||w0||``
    (mean over seeds; alpha on a grid extended at its edges, beta on a grid from 0.1 to 0.995) on
    separately drawn quadratics (seed + 1000), then run on the reported ones.
    Theory: about ``kappa/2 ln(1/tol)`` iterations for GD and ``sqrt(kappa)/2 ln(1/tol)`` for momentum.
    Part 2, stability: the largest step alpha that does not diverge, against beta (theory ``2 (1 + beta) / h_max``).
    Part 3, smoothing: an MLP 64-32-10 on digits with minibatches of 32, ``beta`` in {0, 0.9, 0.99},
    each at its own learning rate tuned on the mean final validation loss; reported on the test digits
    (never used for a choice): the cosine between the update and the full-batch gradient, and the test loss.
    """
    kappas = (10.0, 100.0, 1000.0) if quick else (10.0, 100.0, 1000.0, 10000.0)
    ln_tol = math.log(1 / TOL)
    tune_seeds = [s + TUNE_OFFSET for s in seeds]
    gd, mom, tuned_beta = {}, {}, {}
    tuning: dict[str, Any] = {}

    def problems(kappa: float, which: Sequence[int]) -> tuple[Tensor, Tensor]:
        hs, w0s = zip(*(quadratic(kappa, s) for s in which))
        return torch.stack(hs), torch.stack(w0s)

    for kappa in kappas:
        gd_cap = int(2 * kappa * ln_tol) + 100
        mom_cap = min(gd_cap, int(40 * math.sqrt(kappa) * ln_tol) + 200)
        h, w0 = problems(kappa, tune_seeds)
        gd_cache: dict[float, list[float]] = {}

        def run_gd(alpha: float, seed: int, h: Tensor = h, w0: Tensor = w0, cap: int = gd_cap,
                   cache: dict[float, list[float]] = gd_cache) -> float:
            if alpha not in cache:
                cache[alpha] = heavy_ball(h, w0, torch.tensor([alpha], dtype=torch.float64),
                                          torch.zeros(1, dtype=torch.float64), cap)[0].tolist()
            return cache[alpha][tune_seeds.index(seed)]

        g = tune(run_gd, [0.3, 0.53, 0.95, 1.69, 1.9], tune_seeds)
        m = _tune_quadratic(kappa, tune_seeds, BETAS, mom_cap)
        best = m["per_beta"][m["best_beta"]]
        h, w0 = problems(kappa, seeds)
        alphas = torch.tensor([g.best_lr, best.best_lr], dtype=torch.float64)
        betas = torch.tensor([0.0, m["best_beta"]], dtype=torch.float64)
        counts = heavy_ball(h, w0, alphas, betas, gd_cap)
        gd[kappa], mom[kappa] = counts[0].tolist(), counts[1].tolist()
        tuned_beta[kappa] = m["best_beta"]
        tuning[str(kappa)] = {"gd": tuned_dict(g), "momentum_beta": m["best_beta"], "momentum": tuned_dict(best)}
    n = len(seeds)
    logk = torch.tensor([math.log(k) for k in kappas])

    def slope(counts: list[float]) -> float:
        y = torch.tensor([math.log(c) for c in counts])
        x = logk - logk.mean()
        return float((x * (y - y.mean())).sum() / (x * x).sum())

    gd_slopes = [slope([gd[k][i] for k in kappas]) for i in range(n)]
    mom_slopes = [slope([mom[k][i] for k in kappas]) for i in range(n)]
    stab_betas = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
    stable = {b: [max_stable_step(b, 100.0, s) for s in seeds] for b in stab_betas}

    # part 3: smoothing, each beta at its tuned learning rate (validation), reported on the test digits
    steps = 150 if quick else 300
    smooth = {}
    for b in SMOOTH_BETAS:
        smooth[b] = tune(lambda lr, seed, b=b: _smoothing_run(b, lr, seed, steps), [0.1, 0.3, 1.0], seeds, 3)
    best_runs = {b: [d for d in r.details[r.best_lr]] for b, r in smooth.items()}
    half = lambda c: sum(c[len(c) // 2:]) / len(c[len(c) // 2:])  # noqa: E731
    cos = {b: [half(d["cosine"]) for d in runs] for b, runs in best_runs.items()}
    test = {b: [d["test_final"] for d in runs] for b, runs in best_runs.items()}
    gap = [100 * (t9 / t0 - 1) for t9, t0 in zip(test[0.9], test[0.0])]

    big = [k for k in kappas if k >= 100]
    findings = [
        finding("momentum_fewer_iterations",
                f"tuned momentum reaches ||w|| <= 1e-3 ||w0|| in fewer iterations than tuned GD at every "
                f"condition number >= 100 (at kappa = {kappas[-1]:g}: GD {span(gd[kappas[-1]])}, momentum "
                f"{span(mom[kappas[-1]])} iterations)",
                [all(mom[k][i] < gd[k][i] for k in big) for i in range(n)]),
        finding("gd_linear_momentum_sqrt",
                f"iterations grow like kappa for GD and like sqrt(kappa) for momentum: log-log slopes "
                f"GD {span(gd_slopes, '.2f')}, momentum {span(mom_slopes, '.2f')} "
                "(per seed: GD > 0.85, momentum < 0.65)",
                [gs > 0.85 and ms < 0.65 for gs, ms in zip(gd_slopes, mom_slopes)]),
        finding("larger_stable_step",
                f"with beta = 0.9 the largest stable step alpha is {span(stable[0.9], '.2f')}, at least 1.8x "
                f"GD's {span(stable[0.0], '.2f')} (theory 2(1+beta) = 3.8 against 2)",
                [s9 >= 1.8 * s0 for s9, s0 in zip(stable[0.9], stable[0.0])]),
        finding("momentum_smooths",
                f"on the digits net at tuned learning rates, the update's cosine with the full-batch gradient "
                f"(second half) is higher with beta = 0.9 ({span(cos[0.9], '.2f')}) than with plain SGD "
                f"({span(cos[0.0], '.2f')})",
                [c9 > c0 for c9, c0 in zip(cos[0.9], cos[0.0])]),
        finding("momentum_no_consistent_test_gain",
                f"but the smoother steps buy no consistent gain in test loss: at tuned learning rates beta = 0.9 ends "
                f"lower than plain SGD on {sum(g < 0 for g in gap)} of {n} seeds and at most 25% higher on any "
                f"({span(test[0.9])} against {span(test[0.0])}; difference {span(gap, '+.1f')}%)",
                [g < 25 for g in gap]),
    ]
    notes = [f"kappa {k:g}: iterations GD {span(gd[k])}, momentum {span(mom[k])} (tuned beta {tuned_beta[k]:g})"
             for k in kappas]
    notes += [f"minibatch SGD with beta = {b:g}: tuned lr {r.best_lr:g}{' (at the grid edge)' if r.at_edge else ''}, "
              f"validation loss {span(r.scores[r.best_lr])}, test loss {span(test[b])}" for b, r in smooth.items()]
    numbers: dict[str, Any] = {
        "kappas": list(kappas), "tolerance": TOL, "dimension": DIM,
        "iterations_gd": {str(k): v for k, v in gd.items()},
        "iterations_momentum": {str(k): v for k, v in mom.items()},
        "tuned_beta": {str(k): v for k, v in tuned_beta.items()},
        "slope_gd": gd_slopes, "slope_momentum": mom_slopes, "quadratic_tuning": tuning,
        "max_stable_step": {str(b): v for b, v in stable.items()},
        "smoothing": {str(b): {"tuning": tuned_dict(r), "cosine_second_half": cos[b], "test_loss": test[b]}
                      for b, r in smooth.items()},
    }

    fig, (ax1, ax2, ax3, ax4) = new_figure(4, width=3.9, height=3.5)
    for label, data, color in (("GD", gd, PALETTE[0]), ("momentum", mom, PALETTE[1])):
        mean = [sum(data[k]) / n for k in kappas]
        lo = [mean[j] - min(data[k]) for j, k in enumerate(kappas)]
        hi = [max(data[k]) - mean[j] for j, k in enumerate(kappas)]
        ax1.errorbar(kappas, mean, yerr=[lo, hi], color=color, marker="o", markersize=4, capsize=3,
                     label=f"{label}, tuned")
    ax1.plot(kappas, [kappas[0] / 2 * ln_tol * k / kappas[0] for k in kappas], ":", color="gray",
             label="κ/2 · ln(1/tol)")
    ax1.plot(kappas, [math.sqrt(k) / 2 * ln_tol for k in kappas], "--", color="gray", label="√κ/2 · ln(1/tol)")
    ax1.set(xscale="log", yscale="log", xlabel="condition number κ", ylabel="iterations to ‖w‖ ≤ 1e-3 ‖w₀‖",
            title="quadratic, 50 dimensions")
    ax1.legend(fontsize=7)
    mean_stable = [sum(stable[b]) / n for b in stab_betas]
    ax2.plot(stab_betas, mean_stable, "o", color=PALETTE[1], label="measured (mean over seeds)")
    ax2.plot(stab_betas, [2 * (1 + b) for b in stab_betas], "-", color="gray", linewidth=1, label="2(1+β) / h_max")
    ax2.set(xlabel="momentum β", ylabel="largest stable step α = lr(1−β)", title="κ = 100, h_max = 1")
    ax2.legend(fontsize=7)
    for b, color in zip(SMOOTH_BETAS, PALETTE):
        runs = best_runs[b]
        lr = smooth[b].best_lr
        x = [10 * (i + 1) for i in range(len(runs[0]["cosine"]))]
        band(ax3, x, [d["cosine"] for d in runs], color, f"β = {b:g} (lr {lr:g})")
        band(ax4, [10 * i for i in range(len(runs[0]["test_loss"]))], [d["test_loss"] for d in runs], color,
             f"β = {b:g} (lr {lr:g})")
    ax3.set(xlabel="step (minibatch 32)", ylabel="cos(update, full-batch gradient)",
            title="digits MLP: smoothing", ylim=(0, 1))
    ax4.set(yscale="log", xlabel="step (minibatch 32)", ylabel="test loss (cross-entropy)",
            title="digits MLP: test loss\n(lr tuned on validation)")
    ax3.legend(fontsize=7, loc="upper right")
    ax4.legend(fontsize=7, loc="upper right")
    for ax in (ax1, ax2, ax3, ax4):
        ax.grid(True, alpha=0.3)
    return Outcome(numbers, fig, findings, notes)
