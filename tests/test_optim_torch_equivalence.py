"""descend's SGD, Adam and AdamW against torch.optim, the oracle: 100 steps, several param groups."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch

from descend import optim

STEPS = 100
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


LossFn = Callable[[list[torch.Tensor]], torch.Tensor]


def _problem(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], LossFn]:
    """A random non-convex problem: a quadratic through a random matrix plus a sine term, three tensors."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(6, 4, generator=gen, dtype=dtype), torch.randn(4, generator=gen, dtype=dtype),
              torch.randn(3, 2, generator=gen, dtype=dtype)]
    a = torch.randn(5, 6, generator=gen, dtype=dtype) / 3

    def loss(ps: list[torch.Tensor]) -> torch.Tensor:
        return ((a @ ps[0] + ps[1]) ** 2).mean() + ps[2].sin().sum() + 0.1 * (ps[2] ** 2).sum()

    return params, loss


def _run(make: Callable[[list[dict]], torch.optim.Optimizer], dtype: torch.dtype,
         steps: int = STEPS) -> list[torch.Tensor]:
    init, loss_fn = _problem(dtype)
    if getattr(make, "maximize", False):  # maximize the negated loss: the same bounded trajectory
        loss_fn = (lambda f: lambda ps: -f(ps))(loss_fn)
    params = [p.clone().requires_grad_() for p in init]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "weight_decay": 0.0}]
    opt = make(groups)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params).backward()
        opt.step()
    return [p.detach() for p in params]


CASES: dict[str, tuple[Callable, Callable]] = {
    "sgd-plain": (lambda g: torch.optim.SGD(g, lr=0.05), lambda g: optim.SGD(g, lr=0.05)),
    "sgd-momentum": (lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9),
                     lambda g: optim.SGD(g, lr=0.05, momentum=0.9)),
    "sgd-dampening-wd": (lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1),
                         lambda g: optim.SGD(g, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1)),
    "sgd-nesterov": (lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                     lambda g: optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd-maximize": (lambda g: torch.optim.SGD(g, lr=0.01, momentum=0.5, maximize=True),
                     lambda g: optim.SGD(g, lr=0.01, momentum=0.5, maximize=True)),
    "adam-maximize": (lambda g: torch.optim.Adam(g, lr=0.01, maximize=True),
                      lambda g: optim.Adam(g, lr=0.01, maximize=True)),
    "adam": (lambda g: torch.optim.Adam(g, lr=0.01), lambda g: optim.Adam(g, lr=0.01)),
    "adam-wd": (lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
                lambda g: optim.Adam(g, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    "adam-amsgrad": (lambda g: torch.optim.Adam(g, lr=0.01, amsgrad=True, weight_decay=0.05),
                     lambda g: optim.Adam(g, lr=0.01, amsgrad=True, weight_decay=0.05)),
    "adamw": (lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1),
              lambda g: optim.AdamW(g, lr=0.01, weight_decay=0.1)),
    "adamw-amsgrad": (lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1, amsgrad=True, eps=1e-6),
                      lambda g: optim.AdamW(g, lr=0.01, weight_decay=0.1, amsgrad=True, eps=1e-6)),
    "adam-decoupled-flag": (lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
                            lambda g: optim.Adam(g, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
}


for _name in ("sgd-maximize", "adam-maximize"):
    for _make in CASES[_name]:
        _make.maximize = True  # type: ignore[attr-defined]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_after_100_steps(case: str, dtype: torch.dtype) -> None:
    make_torch, make_descend = CASES[case]
    expected = _run(make_torch, dtype)
    got = _run(make_descend, dtype)
    err = max(float((e - g).abs().max()) for e, g in zip(expected, got))
    moved = max(float((e - i).abs().max()) for e, i in zip(expected, _problem(dtype)[0]))
    assert moved > 0.1, "the problem must actually move the parameters"
    assert err <= TOL[dtype], f"{case}: max abs difference {err:.3g} > {TOL[dtype]:g}"


@pytest.mark.parametrize("case", ["sgd-momentum", "adam-amsgrad", "adamw"])
def test_torch_state_dict_continues_in_descend_and_back(case: str) -> None:
    """50 steps in torch, load its state_dict into descend, 50 more; and the other way round."""
    make_torch, make_descend = CASES[case]
    dtype = torch.float64
    expected = _run(make_torch, dtype, steps=100)
    for first, second in ((make_torch, make_descend), (make_descend, make_torch)):
        init, loss_fn = _problem(dtype)
        params = [p.clone().requires_grad_() for p in init]

        def groups(ps: list[torch.Tensor]) -> list[dict]:
            return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "weight_decay": 0.0}]

        opt = first(groups(params))
        for t in range(100):
            if t == 50:
                saved = opt.state_dict()
                opt = second(groups(params))
                opt.load_state_dict(saved)
            opt.zero_grad()
            loss_fn(params).backward()
            opt.step()
        err = max(float((e - p.detach()).abs().max()) for e, p in zip(expected, params))
        assert err <= 1e-12, f"{case}: {first} -> {second} drifted by {err:.3g}"


def test_state_keys_are_torch_names() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    for opt, keys in [(optim.Adam([p], amsgrad=True), {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
                      (optim.AdamW([p]), {"step", "exp_avg", "exp_avg_sq"}),
                      (optim.SGD([p], momentum=0.9), {"step", "momentum_buffer"}),
                      (optim.Lion([p]), {"step", "exp_avg"})]:
        opt.step()
        assert set(opt.state[p]) == keys


def _torch_optimizer_inputs() -> list[tuple[str, dict]]:
    """torch's own test inputs for its optimizers (``common_optimizers.optim_db``), reused as scenarios."""
    from torch.testing._internal.common_optimizers import optim_db

    cases = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name in ("SGD", "Adam", "AdamW"):
            for entry in info.optim_inputs_func(device="cpu"):
                cases.append((name, dict(entry.kwargs)))
    return cases


TORCH_INPUTS = _torch_optimizer_inputs()


@pytest.mark.parametrize(("name", "kwargs"), TORCH_INPUTS,
                         ids=[f"{n}-{'-'.join(map(str, k)) or 'default'}" for n, k in TORCH_INPUTS])
def test_matches_torch_on_torchs_own_optimizer_inputs(name: str, kwargs: dict) -> None:
    """Every configuration torch's OptimizerInfo tests for SGD/Adam/AdamW, float64, 100 steps."""
    make_torch = getattr(torch.optim, name)
    make_descend = getattr(optim, name)
    # the same arguments give the same update; where torch's inputs leave lr out, both get torch's default
    # (descend's SGD defaults to lr=0.1, the rate of the command line's tasks, where torch's is 1e-3)
    kwargs = {"lr": inspect.signature(make_torch).parameters["lr"].default, **kwargs}

    def torch_factory(groups: list[dict]) -> torch.optim.Optimizer:
        return make_torch(groups, **kwargs)

    def descend_factory(groups: list[dict]) -> torch.optim.Optimizer:
        return make_descend(groups, **kwargs)

    negate = kwargs.get("maximize", False)
    torch_factory.maximize = descend_factory.maximize = negate  # type: ignore[attr-defined]
    expected = _run(torch_factory, torch.float64)
    got = _run(descend_factory, torch.float64)
    err = max(float((e - g).abs().max()) for e, g in zip(expected, got))
    assert err <= 1e-12, f"{name}({kwargs}): max abs difference {err:.3g}"
