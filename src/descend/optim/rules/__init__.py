"""Update rules: what one optimizer step computes, one small elementwise transformation at a time.

A step starts from the gradient and passes an *update* ``u`` through a chain of rules; the
parameter then moves by the result, ``w <- weight_factor * w + u`` (``weight_factor = 1 - lr*lambda``
when the chain has decoupled decay, else 1), and projections (if any) are applied to ``w``.
Every rule is written once, in plain tensor arithmetic, and every engine executes it unchanged.

- :mod:`~descend.optim.rules.base`: :class:`~descend.optim.rules.base.Rule` and its contract;
- :mod:`~descend.optim.rules.descent`: the descent step and regularisation (``scale_by_lr``, ``l2``,
  ``decoupled_decay``, ``clip_by_global_norm``, ``project_box``, ``project_ball``);
- :mod:`~descend.optim.rules.momentum`: ``ema``, ``heavy_ball``;
- :mod:`~descend.optim.rules.normalised`: ``sign``, ``softsign``, ``scale_by_adam``, ``lion``.
"""
