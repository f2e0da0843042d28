"""The optimizer step inside the backward pass: the ordinary step to the bit, one gradient alive at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from descend import optim


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


OPTIMIZERS = {
    "sgd-momentum": lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
    "adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "lion": lambda p: optim.Lion(p, lr=1e-3, weight_decay=0.5),
    "signum-bf16-state": lambda p: optim.Signum(p, lr=1e-2, state_dtype=torch.bfloat16),
    "adamw-int8-state": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, state_dtype="int8"),
    "chain": lambda p: optim.chain(p, optim.ema(0.9), optim.softsign(), optim.decoupled_decay(0.1), lr=1e-2),
    "adamw-reference": lambda p: optim.AdamW(p, lr=1e-2, engine="reference"),
    "torch-adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_stepping_in_backward_equals_the_ordinary_step_bit_for_bit(name: str) -> None:
    ordinary, inside = _model(), _model()
    opt_a, opt_b = OPTIMIZERS[name](ordinary.parameters()), OPTIMIZERS[name](inside.parameters())
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    loss_fn = nn.CrossEntropyLoss()
    with optim.step_in_backward(opt_b):
        for x, y in _batches():
            opt_a.zero_grad(set_to_none=True)
            loss_fn(ordinary(x), y).backward()
            opt_a.step()
            sched_a.step()
            loss_fn(inside(x), y).backward()
            sched_b.step()
            assert all(p.grad is None for p in inside.parameters())
    for a, b in zip(ordinary.parameters(), inside.parameters()):
        assert torch.equal(a, b)
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for key in state_a:
        for field, value in state_a[key].items():
            assert torch.equal(value, state_b[key][field]), (key, field)


def test_at_most_one_gradient_is_alive_during_backward() -> None:
    model = _model()
    params = list(model.parameters())
    alive: list[int] = []
    for p in params:  # registered first, so it runs before the step, when p's gradient has just arrived
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    opt = optim.AdamW(model.parameters(), lr=1e-3)
    with optim.step_in_backward(opt):
        x, y = _batches(1)[0]
        nn.functional.cross_entropy(model(x), y).backward()
    assert alive == [1] * len(params)


def test_tied_weights_are_stepped_once_per_backward() -> None:
    from descend.nn import TransformerLM

    torch.manual_seed(0)
    a = TransformerLM(32, 8, width=16, depth=1, heads=2)  # the output projection is the token embedding
    b = copy.deepcopy(a)
    opt_a, opt_b = optim.AdamW(a.parameters(), lr=1e-2), optim.AdamW(b.parameters(), lr=1e-2)
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(3))
    with optim.step_in_backward(opt_b):
        for _ in range(3):
            opt_a.zero_grad()
            a(idx).logsumexp(-1).mean().backward()
            opt_a.step()
            b(idx).logsumexp(-1).mean().backward()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert int(opt_b.state[b.embed.weight]["step"]) == 3


def test_what_needs_every_gradient_is_refused_in_one_line() -> None:
    model = _model()
    clipped = optim.chain(model.parameters(), optim.clip_by_global_norm(1.0), optim.ema(0.9), lr=1e-2)
    with pytest.raises(ValueError, match="global gradient norm"):
        optim.step_in_backward(clipped)
    with pytest.raises(ValueError, match="flat=True"):
        optim.step_in_backward(optim.AdamW(_model().parameters(), flat=True))
    opt = optim.AdamW(model.parameters())
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="already hold a gradient"):
        optim.step_in_backward(opt)


def test_a_gradient_set_by_hand_between_backward_passes_is_refused() -> None:
    """Each backward pass checks, before its first step, that no other parameter holds a gradient: a stale
    gradient would otherwise be added to the next one and stepped twice."""
    model = _model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1)[0]
    first = next(model.parameters())
    with optim.step_in_backward(opt):
        for _ in range(2):  # passes that each leave no gradient behind
            nn.functional.cross_entropy(model(x), y).backward()
            assert all(p.grad is None for p in model.parameters())
        first.grad = torch.ones_like(first)  # the first layer's gradient is computed last in the backward pass
        with pytest.raises(RuntimeError, match="another parameter holds a gradient"):
            nn.functional.cross_entropy(model(x), y).backward()
        # a backward pass that fails after its check (here in a hook of its own) leaves the next one checking
        opt.zero_grad(set_to_none=True)

        def fail(_: torch.Tensor) -> None:
            raise ValueError("a failure late in the backward pass")

        handle = first.register_post_accumulate_grad_hook(fail)
        with pytest.raises(ValueError, match="late in the backward"):
            nn.functional.cross_entropy(model(x), y).backward()
        handle.remove()
        opt.zero_grad(set_to_none=True)
        first.grad = torch.ones_like(first)
        with pytest.raises(RuntimeError, match="another parameter holds a gradient"):
            nn.functional.cross_entropy(model(x), y).backward()


def test_removing_the_hooks_restores_the_ordinary_step() -> None:
    model = _model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    handle = optim.step_in_backward(opt)
    handle.remove()
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # backward alone moved nothing
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_an_l2_penalty_is_added_to_each_gradient_before_its_step() -> None:
    ordinary, inside = _model(), _model()
    opt_a, opt_b = optim.AdamW(ordinary.parameters(), lr=1e-2), optim.AdamW(inside.parameters(), lr=1e-2)
    with optim.step_in_backward(opt_b, l2=0.05):
        for x, y in _batches(3):
            opt_a.zero_grad()
            nn.functional.cross_entropy(ordinary(x), y).backward()
            with torch.no_grad():
                for p in ordinary.parameters():
                    p.grad.add_(p, alpha=0.05)  # the gradient of 0.05/2 ||w||^2
            opt_a.step()
            nn.functional.cross_entropy(inside(x), y).backward()
    assert all(torch.equal(a, b) for a, b in zip(ordinary.parameters(), inside.parameters()))
    with pytest.raises(ValueError, match="l2="):
        optim.step_in_backward(optim.SGD(_model().parameters(), lr=0.1), l2=-1.0)
