"""Adam next to softsign momentum and Signum: the directions they would take from the same gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from descend import optim
from descend.experiments._common import Outcome, digits, flat, loss_of, minibatches, new_figure, seed_all
from descend.nn import MLP

#: Label -> optimizer at lr 1 (so ``w_before - w_after`` is the direction itself).
BATCH, HIDDEN, DEPTH = 32, 64, 3
SHADOWS: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "softsign momentum (eps 1e-8)": lambda p: optim.Softsign(p, lr=1.0, beta=0.9, eps=1e-8),
    "softsign momentum (eps 1e-4)": lambda p: optim.Softsign(p, lr=1.0, beta=0.9, eps=1e-4),
    "Signum": lambda p: optim.Signum(p, lr=1.0, beta=0.9),
    "momentum (EMA)": lambda p: optim.Momentum(p, lr=1.0, beta=0.9),
    "SGD (the gradient)": lambda p: optim.SGD(p, lr=1.0),
}


def _cosine(a: Tensor, b: Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def adam_softsign(*, quick: bool = False, seed: int = 0) -> Outcome:
    """Adam's update direction is close to softsign momentum's, far from the raw gradient's.

    An MLP 64-64-64-64-10 (ReLU) is trained on digits (minibatches of 32) by :class:`descend.optim.Adam`
    (lr 3e-3, betas (0.9, 0.999)). Each other method keeps its own state on a shadow copy of the
    weights: at every step the shadow is reset to Adam's weights, given Adam's minibatch gradient and
    stepped with lr 1, so all directions come from the same gradient stream along Adam's trajectory:
    softsign momentum ``m/(|m|+eps)`` (beta 0.9, eps 1e-8 and 1e-4), Signum ``sign(m)``, EMA momentum
    ``m`` and the gradient ``g``. Reported: the cosine similarity (over all weights) of each direction
    with Adam's ``m_hat/(sqrt(v_hat)+eps)``, step by step and averaged over the second half of training.
    """
    x, y, _, _ = digits(seed)
    steps = 300 if quick else 600
    gen = seed_all(seed)
    model = MLP(x.shape[1], 10, hidden=HIDDEN, depth=DEPTH)
    params = list(model.parameters())
    adam = optim.Adam(params, lr=3e-3)
    shadows = {label: [p.detach().clone() for p in params] for label in SHADOWS}
    shadow_opts = {label: make(shadows[label]) for label, make in SHADOWS.items()}
    cosines: dict[str, list[float]] = {label: [] for label in SHADOWS}
    losses: list[float] = []
    batches = minibatches(len(y), BATCH, gen)
    adam_dir = torch.zeros(0)
    shadow_dir: dict[str, Tensor] = {}
    for t in range(1, steps + 1):
        idx = next(batches)
        adam.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        before = flat(params)
        for label, shadow in shadows.items():
            with torch.no_grad():
                for s, p in zip(shadow, params):
                    s.copy_(p)
                    s.grad = p.grad.clone()
            shadow_opts[label].step()
            shadow_dir[label] = before - flat(shadow)
        adam.step()
        adam_dir = (before - flat(params)) / 3e-3
        for label in SHADOWS:
            cosines[label].append(_cosine(adam_dir, shadow_dir[label]))
        if t % 10 == 0:
            losses.append(loss_of(model, x, y))
    half = steps // 2
    mean_cos = {label: sum(c[half:]) / len(c[half:]) for label, c in cosines.items()}
    numbers: dict[str, Any] = {"steps": steps, "adam_lr": 3e-3, "final_loss": losses[-1],
                               "mean_cosine_second_half": mean_cos, "cosine": cosines}
    finding = [f"cosine with Adam's direction, mean over steps {half + 1}..{steps}:"]
    finding += [f"  {label}: {c:.3f}" for label, c in mean_cos.items()]
    finding.append(f"Adam's training loss after {steps} steps: {losses[-1]:.4f}")

    fig, (ax1, ax2) = new_figure(2, width=4.6)
    for label, c in cosines.items():
        ax1.plot(range(1, steps + 1), c, label=label, linewidth=1)
    ax1.set(xlabel="step along Adam's trajectory", ylabel="cos(Adam direction, other direction)",
            title="same gradients, different rules", ylim=(0, 1))
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    pick = torch.randperm(len(adam_dir), generator=torch.Generator().manual_seed(seed))[:3000]
    ss = shadow_dir["softsign momentum (eps 1e-8)"]
    ax2.scatter(ss[pick].tolist(), adam_dir[pick].tolist(), s=3, alpha=0.4)
    ax2.set(xlabel="softsign momentum m/(|m|+eps), last step", ylabel="Adam m̂/(√v̂+eps), last step",
            title="per weight (3000 sampled)")
    ax2.grid(True, alpha=0.3)
    return Outcome(numbers, fig, finding)
