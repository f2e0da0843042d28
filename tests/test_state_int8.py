"""8-bit blockwise optimizer state (``state_dtype="int8"``): the step against a hand-written one, the bytes it
keeps, and state_dicts that move between 8-bit and float state.

Every engine against the reference engine on 8-bit state: ``tests/test_engine_differential.py``.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from descend import optim
from descend.optim._blockwise import dequantize, quantize, round_trip
from descend.optim.engines.foreach import CHUNK
from descend.optim.engines.store import element_noise, rounding_seeds, state_slot


def _grads(p: torch.Tensor, steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) * 10.0 ** float(k % 3 - 1) for k in range(steps)]


def test_an_int8_adamw_step_is_dequantise_the_rule_quantise_with_the_hash_noise() -> None:
    """The oracle, written out: per step, dequantise m and v (v in the unsigned code), Adam's update in float32,
    quantise each with the noise of its element (the step, the parameter's ordinal and the state's slot)."""
    b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 1e-2, 0.1
    w = torch.randn(700, generator=torch.Generator().manual_seed(1))
    p = nn.Parameter(w.clone())
    opt = optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, state_dtype="int8", engine="reference")
    m = quantize(torch.zeros(700), "dynamic", True, stochastic=False)
    v = quantize(torch.zeros(700), "dynamic", False, stochastic=False)
    for t, g in enumerate(_grads(p, 4), start=1):
        p.grad = g
        opt.step()
        mf, vf = dequantize(*m, "dynamic", True), dequantize(*v, "dynamic", False)
        mf = torch.lerp(mf, g, 1 - b1)
        vf = vf * b2 + g * (1 - b2) * g
        update = (mf / (1 - b1**t)) / ((vf / (1 - b2**t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * update
        seeds = [rounding_seeds(torch.tensor(float(t)), [0], state_slot(0, j)) for j in (0, 1)]
        m = quantize(mf, "dynamic", True, element_noise(seeds[0][0], mf))
        v = quantize(vf, "dynamic", False, element_noise(seeds[1][0], vf))
        state = opt.state[p]
        assert torch.equal(state["exp_avg"], m[0]) and torch.equal(state["exp_avg_scales"], m[1])
        assert torch.equal(state["exp_avg_sq"], v[0]) and torch.equal(state["exp_avg_sq_scales"], v[1])
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)  # Adam's division: within rounding


def test_foreach_cuts_a_large_tensor_at_whole_blocks() -> None:
    """A tensor larger than the foreach engine's chunk steps in pieces; each piece starts on a block boundary, so
    the codes and scales are the reference engine's."""
    n = CHUNK + 1000
    out = {}
    for engine in ("reference", "foreach"):
        p = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(2)))
        opt = optim.Lion([p], lr=1e-3, state_dtype="int8", engine=engine)
        for g in _grads(p, 3):
            p.grad = g
            opt.step()
        out[engine] = (p.detach().clone(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_scales"])
    assert all(torch.equal(a, b) for a, b in zip(out["foreach"], out["reference"]))


@pytest.mark.parametrize("name,tensors", [("AdamW", 2), ("Lion", 1), ("SGD", 1)])
def test_the_state_is_one_byte_per_value_and_a_scale_per_256(name: str, tensors: int) -> None:
    sizes = [(300, 7), (1000,), (256,), ()]
    params = [nn.Parameter(torch.randn(s)) for s in sizes]
    kw = {"momentum": 0.9} if name == "SGD" else {}
    opt = getattr(optim, name)(params, lr=1e-3, state_dtype="int8", **kw)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    held = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
    expected = tensors * sum(p.numel() + 4 * -(-p.numel() // 256) for p in params)
    assert held == expected
    floats = [k for s in opt.state.values() for k, t in s.items() if t.dtype == torch.float32 and k != "step"]
    assert all(k.endswith("_scales") for k in floats)


def _trained(state_dtype: object, steps: int = 3) -> tuple[nn.Parameter, torch.optim.Optimizer]:
    p = nn.Parameter(torch.randn(600, generator=torch.Generator().manual_seed(3)))
    opt = optim.Adam([p], lr=1e-2, state_dtype=state_dtype)
    for g in _grads(p, steps):
        p.grad = g
        opt.step()
    return p, opt


def test_a_state_dict_saves_plain_tensors_and_resumes_bit_for_bit() -> None:
    p, opt = _trained("int8", 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    q = nn.Parameter(p.detach().clone())
    again = optim.Adam([q], lr=1e-2, state_dtype="int8")
    again.load_state_dict(saved)
    for g in _grads(p, 3, seed=9):
        p.grad, q.grad = g, g.clone()
        opt.step()
        again.step()
    assert torch.equal(p, q)
    assert all(torch.equal(opt.state[p][k], again.state[q][k]) for k in opt.state[p])


def test_loading_float32_state_into_an_int8_optimizer_quantises_it() -> None:
    p, opt = _trained(None)
    saved = opt.state_dict()
    eight = optim.Adam([p], lr=1e-2, state_dtype="int8")
    eight.load_state_dict(saved)
    state = eight.state[p]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        assert state[key].dtype == torch.uint8
        values = dequantize(state[key], state[f"{key}_scales"], "dynamic", signed)
        assert torch.equal(values, round_trip(saved["state"][0][key], "dynamic", signed, stochastic=False))
    p.grad = torch.randn(600)
    eight.step()  # and it steps


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, "float32"])
def test_loading_int8_state_into_a_float_optimizer_dequantises_it(state_dtype: object) -> None:
    p, opt = _trained("int8")
    saved = opt.state_dict()
    plain = optim.Adam([p], lr=1e-2, state_dtype=state_dtype)
    plain.load_state_dict(saved)
    state = plain.state[p]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
    dtype = torch.bfloat16 if state_dtype == torch.bfloat16 else torch.float32
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        values = dequantize(saved["state"][0][key], saved["state"][0][f"{key}_scales"], "dynamic", signed)
        assert torch.equal(state[key], values.to(dtype))
    p.grad = torch.randn(600)
    plain.step()


def test_a_bad_state_dtype_or_flat_int8_state_is_refused_in_one_line() -> None:
    p = nn.Parameter(torch.zeros(3))
    for bad in ("int4", torch.int8, "uint8", 8):
        with pytest.raises(ValueError, match=r"state_dtype must be .*'bfloat16', 'float16', 'float64', 'int8'"):
            optim.AdamW([p], state_dtype=bad)
    with pytest.raises(ValueError, match="flat=True does not take state_dtype='int8'"):
        optim.AdamW([p], state_dtype="int8", flat=True)


def test_an_int8_state_of_another_size_is_refused() -> None:
    p, opt = _trained("int8")
    opt.state[p]["exp_avg_scales"] = torch.ones(2)
    p.grad = torch.randn(600)
    with pytest.raises(RuntimeError, match=r"'exp_avg_scales' .* expected shape \(3,\)"):
        opt.step()


def test_a_nan_makes_its_block_nan_and_leaves_the_others() -> None:
    """A NaN gradient: its block of 256 state values reads back NaN (not clipped to a scale that ignores it), the
    other blocks as without it."""
    p, opt = _trained("int8", 1)
    clean = optim.Adam([nn.Parameter(p.detach().clone())], lr=1e-2, state_dtype="int8")
    clean.load_state_dict(opt.state_dict())
    q = clean.param_groups[0]["params"][0]
    g = torch.randn(600)
    p.grad, q.grad = g.clone(), g.clone()
    p.grad[5] = float("nan")
    opt.step()
    clean.step()
    values = dequantize(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_scales"], "dynamic", True)
    assert bool(values[:256].isnan().all()) and bool(p[5].isnan())
    assert torch.equal(opt.state[p]["exp_avg"][256:], clean.state[q]["exp_avg"][256:])
