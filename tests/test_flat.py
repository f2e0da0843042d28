"""``flat=True``: parameters, gradients and state as views of one buffer per group, stepped as one tensor."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch

from descend import optim
from descend.optim._flat import ALIGN, LANES
from descend.optim.engines.store import element_noise
from test_engines import PRESETS, CountingBackend, assert_close, compile_backend, run


def buffer_of(opt: optim.ChainOptimizer, group: int = 0) -> Any:
    assert opt.flat_layout is not None
    (buffer,) = opt.flat_layout.groups[group]
    return buffer


def inside(t: torch.Tensor, flat: torch.Tensor) -> bool:
    """Whether ``t``'s elements lie in ``flat``'s storage."""
    start = flat.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + flat.numel() * 4


def steps_as_one_tensor(opt: torch.optim.Optimizer, engine: str) -> int:
    """1 if group 0 took the last step as one flat tensor (the public report counts a buffer as one), else 0."""
    return int((0, engine, 1) in [(r.group, r.kernel, r.tensors) for r in opt.last_step_kernels])


# -- the same trajectory as the reference engine ------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("engine", ["reference", "foreach", "compiled"])
def test_flat_matches_the_reference_engine(name: str, engine: str) -> None:
    """Every preset, two groups, mixed shapes, a parameter that sometimes has no gradient (its group then
    steps tensor by tensor); ball projections stay per tensor, clipping uses the global norm."""
    backend = CountingBackend() if engine == "compiled" else None
    as_one: list[int] = []
    out = run(PRESETS[name], engine, flat=True, backend=backend, after_step=lambda o: as_one.append(
        steps_as_one_tensor(o, engine)))
    assert_close(out, run(PRESETS[name], "reference"))
    if engine != "reference":
        assert sum(as_one) >= 19  # group 0 stepped as one tensor after its first step


def test_flat_float64_matches_reference() -> None:
    assert_close(run(PRESETS["adamw"], "foreach", flat=True, dtype=torch.float64),
                 run(PRESETS["adamw"], "reference", dtype=torch.float64), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "lion_maximize", "adam_amsgrad_ball", "user_chain"])
def test_flat_inductor_matches_reference(name: str) -> None:
    assert_close(run(PRESETS[name], "compiled", flat=True, backend="inductor", steps=8),
                 run(PRESETS[name], "reference", steps=8))


# -- the layout ------------------------------------------------------------------------------------------
def test_parameters_gradients_and_state_live_in_one_buffer() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 5), (7,), (2, 2, 2)]]
    values = [p.detach().clone() for p in params]
    params[1].grad = torch.full((7,), 2.0)
    opt = optim.Adam(params, lr=0.1, flat=True)
    buffer = buffer_of(opt)
    assert buffer.numel % LANES == 0 and all(o % ALIGN == 0 for o in buffer.offsets)
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v) and inside(p, buffer.data) and inside(p.grad, buffer.grad)
    assert torch.equal(params[1].grad, torch.full((7,), 2.0)) and torch.equal(params[0].grad, torch.zeros(3, 5))
    for _ in range(2):
        opt.step()
    for p in params:
        assert inside(opt.state[p]["exp_avg"], buffer.states["exp_avg"])
        assert inside(opt.state[p]["exp_avg_sq"], buffer.states["exp_avg_sq"])
    assert float(buffer.data.abs().sum()) == pytest.approx(sum(float(p.detach().abs().sum()) for p in params))


def test_flat_buffers_are_per_device_dtype_and_group() -> None:
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(5))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    strided = torch.nn.Parameter(torch.randn(4, 3).t())
    opt = optim.SGD([{"params": [a, b, frozen, strided]}, {"params": [c]}], lr=0.1, flat=True)
    assert opt.flat_layout is not None
    kinds = sorted(str(buf.data.dtype) for buf in opt.flat_layout.groups[0])
    assert kinds == ["torch.float32", "torch.float64"] and len(opt.flat_layout.groups[1]) == 1
    assert opt.flat_layout.position(frozen) is None and opt.flat_layout.position(strided) is None
    assert not strided.is_contiguous()  # left as it was


def test_flat_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="flat must be True or False"):
        optim.AdamW([torch.nn.Parameter(torch.randn(2))], flat="yes")  # type: ignore[arg-type]


# -- training with autograd --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["foreach", "compiled"])
@pytest.mark.parametrize("zero", ["optimizer", "module"])
def test_training_matches_torch_adamw(engine: str, zero: str) -> None:
    """``backward`` accumulates into the gradient views; ``module.zero_grad()`` (set_to_none) makes autograd
    allocate new gradients, which the step copies into the buffer. Either way: torch's AdamW trajectory."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    oracle = copy.deepcopy(model)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, engine=engine, flat=True)
    ref = torch.optim.AdamW(oracle.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    buffer = buffer_of(opt)
    as_one = 0
    for _ in range(8):
        for net, o in ((model, opt), (oracle, ref)):
            torch.nn.functional.mse_loss(net(x), y).backward()
            with compile_backend(CountingBackend()):
                o.step()
            if zero == "module":
                net.zero_grad()
            else:
                o.zero_grad()
        as_one += steps_as_one_tensor(opt, engine)
        if zero == "optimizer":
            assert all(p.grad is v for p, v in zip(model.parameters(), buffer.grad_views))
            assert float(buffer.grad.abs().sum()) == 0.0
    for a, b in zip(model.parameters(), oracle.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert as_one == 7


def test_a_parameter_without_gradient_skips_the_step_as_in_torch() -> None:
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))]
    opt = optim.AdamW(params, lr=0.1, engine="foreach", flat=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones(p.shape)
        params[1].grad = None
        opt.step()
    assert torch.equal(params[1].detach(), torch.ones(3)) and "step" not in opt.state[params[1]]
    assert float(opt.state[params[0]]["step"]) == 3 and float(params[0].detach()[0]) < 1


def test_zero_grad_keeps_views_and_lets_frozen_parameters_skip() -> None:
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))]
    opt = optim.Lion(params, lr=0.1, weight_decay=1.0, engine="foreach", flat=True)
    for p in params:
        p.grad.fill_(1.0)  # type: ignore[union-attr]
    opt.step()
    params[1].requires_grad_(False)
    opt.zero_grad()
    assert params[1].grad is None and torch.equal(params[0].grad, torch.zeros(4))  # type: ignore[arg-type]
    frozen = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), frozen)  # no gradient, no step: decay does not shrink it
    opt.zero_grad(set_to_none=False)
    assert params[1].grad is None


def test_moved_parameters_leave_the_layout_with_a_warning() -> None:
    model = torch.nn.Linear(4, 2)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, engine="foreach", flat=True)
    model.double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(x).sum().backward()
            before = model.weight.detach().clone()
            opt.step()
            opt.zero_grad()
            assert not torch.equal(before, model.weight.detach())
    assert sum("moved or replaced" in str(w.message) for w in caught) == 1
    assert opt.flat_layout is not None and opt.flat_layout.groups[0] == []


# -- state: save, load, copy -------------------------------------------------------------------------
def test_loaded_state_moves_into_the_buffers_again() -> None:
    """``load_state_dict`` puts fresh tensors in the state (bit-identical resumption is tested with bf16
    state in test_engines); the next step copies them into the flat buffers and steps as one tensor."""
    params = [torch.nn.Parameter(torch.ones(s)) for s in [(3,), (2, 5)]]
    opt = optim.Adam(params, lr=0.1, engine="foreach", flat=True)
    for _ in range(2):
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    assert not inside(opt.state[params[0]]["exp_avg"], buffer_of(opt).states["exp_avg"])
    opt.step()
    assert inside(opt.state[params[0]]["exp_avg"], buffer_of(opt).states["exp_avg"])
    assert float(opt.state[params[1]]["step"]) == 3


def test_a_deep_copy_lays_out_its_own_parameters() -> None:
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = optim.Lion(params, lr=0.1, engine="foreach", flat=True)
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    for p in twin_params:
        p.grad = torch.ones(p.shape)
    twin.step()
    twin.step()
    assert all(torch.equal(p.detach(), torch.ones(p.shape)) for p in params)
    assert all(float(p.detach()[0]) == pytest.approx(0.8) for p in twin_params)
    assert twin.flat_layout is not None and inside(twin_params[0], buffer_of(twin).data)


# -- bf16 state: the same noise whichever way a parameter steps -------------------------------------------
def test_lanes_index_equals_the_arange_index() -> None:
    like = torch.zeros(5, 16)
    lanes = torch.arange(16, dtype=torch.int32)
    seed = torch.tensor(123456789, dtype=torch.int32)
    assert torch.equal(element_noise(seed, like, 48, lanes), element_noise(seed, like.view(-1), 48).view(5, 16))
