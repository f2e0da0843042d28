"""The optimizer family: update rules written once, chained into optimizers, run by engines.

A step passes the gradient through a chain of elementwise rules and adds the result to the weights::

    u <- g;  u <- rule_1(u);  ...;  u <- -lr * u;  w <- w + u;  (projection)

Named optimizers are presets of the same chain; :func:`chain` composes your own::

    from descend import optim
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    opt = optim.chain(model.parameters(), optim.ema(0.9), optim.sign(), optim.decoupled_decay(0.1), lr=1e-3)
    print(optim.explain(opt))

:func:`step_in_backward` runs an optimizer's step inside ``backward()``, one parameter at a time, so
at most one parameter's gradient is alive.
"""

from descend.optim._chain import ChainOptimizer, chain
from descend.optim._explain import constraint_state, explain, implied_radius
from descend.optim._in_backward import StepInBackward, step_in_backward
from descend.optim._presets import OPTIMIZERS, SGD, Adam, AdamW, Lion, Momentum, SignSGD, Signum, Softsign, create
from descend.optim.rules.base import Rule
from descend.optim.rules.descent import clip_by_global_norm, decoupled_decay, l2, project_ball, project_box, scale_by_lr
from descend.optim.rules.momentum import ema, heavy_ball
from descend.optim.rules.normalised import lion, scale_by_adam, sign, softsign

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "Adam",
    "AdamW",
    "ChainOptimizer",
    "Lion",
    "Momentum",
    "Rule",
    "SignSGD",
    "Signum",
    "Softsign",
    "StepInBackward",
    "chain",
    "clip_by_global_norm",
    "constraint_state",
    "create",
    "decoupled_decay",
    "ema",
    "explain",
    "heavy_ball",
    "implied_radius",
    "l2",
    "lion",
    "project_ball",
    "project_box",
    "scale_by_adam",
    "scale_by_lr",
    "sign",
    "softsign",
    "step_in_backward",
]
