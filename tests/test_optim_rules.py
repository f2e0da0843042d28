"""Hand-computed steps and properties of the update rules (Momentum, SignSGD, Signum, Softsign, Lion...)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from descend import optim

F64 = torch.float64


def _steps(opt_factory, w0: list[float], grads: list[list[float]]) -> list[list[float]]:
    """Apply the given gradients one step at a time; return the weights after each step."""
    w = torch.tensor(w0, dtype=F64, requires_grad=True)
    opt = opt_factory([w])
    out = []
    for g in grads:
        w.grad = torch.tensor(g, dtype=F64)
        opt.step()
        out.append(w.detach().tolist())
    return out


def test_momentum_ema_by_hand() -> None:
    # m1 = 0.1 g, w1 = w0 - 0.1 m1; m2 = 0.9 m1 + 0.1 g, w2 = w1 - 0.1 m2
    got = _steps(lambda p: optim.Momentum(p, lr=0.1, beta=0.9), [1.0, -2.0], [[0.5, -1.0], [0.5, -1.0]])
    assert got[0] == pytest.approx([0.995, -1.99], abs=1e-15)
    assert got[1] == pytest.approx([0.9855, -1.971], abs=1e-15)


def test_signsgd_by_hand() -> None:
    got = _steps(lambda p: optim.SignSGD(p, lr=0.1), [1.0, -2.0, 3.0], [[0.5, -1e-8, 0.0]])
    assert got[0] == pytest.approx([0.9, -1.9, 3.0], abs=1e-15)


def test_signum_follows_the_sign_of_the_average() -> None:
    # m1 = 0.1 g; m2 = 0.09 g - 0.005 g = 0.085 g; m3 = 0.0765 g - 0.1 g = -0.0235 g
    g = [1.0, -4.0]
    grads = [g, [-0.05 * x for x in g], [-1.0 * x for x in g]]
    got = _steps(lambda p: optim.Signum(p, lr=0.1, beta=0.9), [0.0, 0.0], grads)
    assert got == [pytest.approx([-0.1, 0.1]), pytest.approx([-0.2, 0.2]), pytest.approx([-0.1, 0.1])]


def test_softsign_by_hand() -> None:
    # m = 0.1 g = [0.05, -0.005]; u = m / (|m| + 0.01) = [5/6, -1/3]
    got = _steps(lambda p: optim.Softsign(p, lr=0.1, beta=0.9, eps=0.01), [1.0, 1.0], [[0.5, -0.05]])
    assert got[0] == pytest.approx([1 - 0.1 * 5 / 6, 1 + 0.1 / 3], abs=1e-15)


def test_lion_by_hand_with_decoupled_decay() -> None:
    # c1 = 0.1 g -> sign(g), m1 = 0.01 g; c2 = (0.009 - 0.005) g -> sign(g), m2 = 0.0094 g;
    # c3 = (0.00846 - 0.02) g -> -sign(g). Each step: w <- (1 - lr*lambda) w - lr * sign(c).
    g = [2.0, -3.0]
    grads = [g, [-0.05 * x for x in g], [-0.2 * x for x in g]]
    lr, lam = 0.1, 0.5
    got = _steps(lambda p: optim.Lion(p, lr=lr, betas=(0.9, 0.99), weight_decay=lam), [1.0, 1.0], grads)
    w = [1.0, 1.0]
    for direction in (1, 1, -1):
        w = [(1 - lr * lam) * wi - lr * direction * math.copysign(1, gi) for wi, gi in zip(w, g)]
        assert got.pop(0) == pytest.approx(w, abs=1e-15)


def test_adam_first_step_moves_each_coordinate_by_lr() -> None:
    g = torch.tensor([1e-3, -5.0, 300.0, -2e-2], dtype=F64)
    w = torch.zeros(4, dtype=F64, requires_grad=True)
    w.grad = g
    optim.Adam([w], lr=0.01, eps=1e-12).step()
    assert torch.allclose(w.detach().abs(), torch.full((4,), 0.01, dtype=F64), rtol=1e-8)
    assert torch.equal(torch.sign(w.detach()), -torch.sign(g))


def test_heavy_ball_first_step_copies_the_gradient() -> None:
    """torch.optim.SGD semantics: b <- g on step 1, dampening only from step 2."""
    got = _steps(lambda p: optim.SGD(p, lr=1.0, momentum=0.5, dampening=0.5), [0.0], [[2.0], [2.0]])
    assert got[0] == pytest.approx([-2.0])  # b1 = 2
    assert got[1] == pytest.approx([-4.0])  # b2 = 0.5*2 + 0.5*2 = 2


def test_lr_independent_decoupled_decay() -> None:
    opt_w = torch.tensor([4.0], dtype=F64, requires_grad=True)
    opt = optim.chain([opt_w], optim.sign(), optim.decoupled_decay(0.25, lr_scaled=False), lr=0.5)
    opt_w.grad = torch.tensor([1.0], dtype=F64)
    opt.step()
    assert opt_w.item() == pytest.approx(0.75 * 4.0 - 0.5)


def test_clip_by_global_norm_matches_torch_clip() -> None:
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(5, generator=gen, dtype=F64) * 10, torch.randn(3, generator=gen, dtype=F64)]
    params = [torch.zeros(5, dtype=F64, requires_grad=True), torch.zeros(3, dtype=F64, requires_grad=True)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optim.SGD(params, lr=1.0, max_grad_norm=2.0).step()
    clipped = [g.clone() for g in grads]
    torch.nn.utils.clip_grad_norm_([torch.nn.Parameter(torch.zeros_like(g)) for g in clipped], 2.0)
    ref = [g.clone().requires_grad_() for g in grads]
    for r in ref:
        r.grad = r.detach().clone()
    torch.nn.utils.clip_grad_norm_(ref, 2.0)
    for p, r in zip(params, ref):
        assert torch.allclose(p.detach(), -r.grad, atol=1e-12)
    assert math.isclose(float(torch.cat([p.detach() for p in params]).norm()), 2.0, rel_tol=1e-5)


# -- properties -----------------------------------------------------------------------------------

finite = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(w=st.lists(finite, min_size=1, max_size=8), seed=st.integers(0, 2**16), lr=st.sampled_from([1e-3, 0.1, 0.5]))
def test_sign_step_moves_every_coordinate_with_gradient_by_exactly_lr(w: list[float], seed: int, lr: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.tensor(w, dtype=F64)
    g = torch.randn(len(w), generator=gen, dtype=F64)
    g[torch.rand(len(w), generator=gen) < 0.2] = 0.0
    for make in (lambda p: optim.SignSGD(p, lr=lr), lambda p: optim.Signum(p, lr=lr), lambda p: optim.Lion(p, lr=lr)):
        p = w0.clone().requires_grad_()
        p.grad = g.clone()
        make([p]).step()
        moved = (p.detach() - w0).abs()
        expected = torch.where(g != 0, torch.full_like(g, lr), torch.zeros_like(g))
        assert torch.allclose(moved, expected, atol=1e-12 * (1 + w0.abs().max().item()))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), lam=st.sampled_from([0.5, 1.0, 4.0]), name=st.sampled_from(["lion", "signum"]))
def test_decoupled_decay_pulls_sign_methods_into_the_box(seed: int, lam: float, name: str) -> None:
    """Started at up to 3/lambda, Lion/Signum with decoupled decay end inside ||w||_inf <= 1/lambda + lr."""
    gen = torch.Generator().manual_seed(seed)
    lr = 0.02
    w = ((torch.rand(16, generator=gen, dtype=F64) * 2 - 1) * 3 / lam).requires_grad_()
    opt = optim.create(name, [w], lr=lr, weight_decay=lam)
    assert optim.constraint_state(opt)[0]["radius"] == pytest.approx(1 / lam)
    steps = int(3 * math.log(3) / (lr * lam)) + 50
    for _ in range(steps):
        w.grad = torch.randn(16, generator=gen, dtype=F64)
        opt.step()
    assert w.detach().abs().max().item() <= 1 / lam + lr
    state = optim.constraint_state(opt)[0]
    assert state["max_abs_weight_over_radius"] == pytest.approx(w.detach().abs().max().item() * lam)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), radius=st.sampled_from([0.1, 1.0, 3.0]), kind=st.sampled_from(["box", "ball"]))
def test_projection_keeps_the_constraint_exactly(seed: int, radius: float, kind: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, F64):
        w = (torch.randn(4, 5, generator=gen, dtype=dtype) * 5).requires_grad_()
        opt = optim.Adam([w], lr=0.5, constraint=kind, radius=radius)
        for _ in range(5):
            w.grad = torch.randn(4, 5, generator=gen, dtype=dtype)
            opt.step()
            if kind == "box":  # exact, against the radius as the parameter's dtype represents it
                assert w.detach().abs().max().item() <= torch.tensor(radius, dtype=dtype).item()
            else:
                assert torch.linalg.vector_norm(w.detach()).item() <= radius * (1 + 4 * torch.finfo(dtype).eps)


def test_signum_chain_equals_the_preset_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, generator=gen) for _ in range(10)]
    a = torch.randn(7, generator=gen).requires_grad_()
    b = a.detach().clone().requires_grad_()
    preset = optim.Signum([a], lr=0.01, beta=0.8, weight_decay=0.3)
    composed = optim.chain([b], optim.ema(0.8), optim.sign(), optim.decoupled_decay(0.3), lr=0.01)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        preset.step()
        composed.step()
    assert torch.equal(a, b)


def test_two_rules_with_the_same_names_get_distinct_keys() -> None:
    w = torch.zeros(3, requires_grad=True)
    opt = optim.chain([w], optim.ema(0.5), optim.ema(0.9), lr=1.0)
    assert {"beta", "ema.beta"} <= set(opt.param_groups[0])
    w.grad = torch.ones(3)
    opt.step()
    # m1 = 0.5*g = 0.5; m2 = 0.1*m1 = 0.05; w = -0.05
    assert set(opt.state[w]) == {"step", "exp_avg", "ema.exp_avg"}
    assert torch.allclose(w.detach(), torch.full((3,), -0.05))
