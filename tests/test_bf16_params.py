"""bfloat16 parameters without a float32 copy: stepped in float32, stored with stochastic rounding.

Oracles: the expectation of stochastic rounding (an update far below half a bf16 ulp moves the weights by
that update on average, where rounding to nearest leaves them as they are), torch.optim (which rounds to
nearest: ``param_rounding="nearest"`` reproduces it), the reference engine (every other engine equals it
bit for bit; generated cases: ``tests/test_engine_differential.py``), and an uninterrupted run (a resumed
one equals it).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from descend import optim
from descend.optim.engines import compiled

ENGINES = ["reference", "foreach", "native", "auto", "compiled"]


@pytest.fixture(autouse=True)
def eager_compiles(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The compiled engine's traced graph runs eagerly (inductor's code generation: tests/test_engines.py)."""
    monkeypatch.setattr(compiled, "BACKEND", lambda gm, example_inputs: gm.forward)
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "descend-cache"))


def bf16_params(seed: int = 0, shapes: tuple[tuple[int, ...], ...] = ((300,), (17, 5), (40000,))) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(torch.bfloat16)) for shape in shapes]


def train(make: Callable[..., torch.optim.Optimizer], params: list[nn.Parameter], steps: int, seed: int = 1,
          first: int = 0) -> torch.optim.Optimizer:
    """``steps`` steps on gradients drawn from ``seed`` (the ``first`` ones skipped: a resumed run)."""
    opt = make(params)
    gen = torch.Generator().manual_seed(seed)
    for step in range(first + steps):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params]
        if step < first:
            continue
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return opt


@pytest.mark.parametrize("engine", ["reference", "foreach", "native"])
def test_an_update_far_below_half_an_ulp_moves_the_weights_by_it_on_average(engine: str) -> None:
    """SGD by 1e-4 on weights at 1.0 (a bf16 ulp below 1 is 2**-8 = 0.0039): rounding to nearest leaves
    every weight at 1.0; stochastic rounding moves the mean by the update, each weight by 0 or one ulp."""
    def step(rounding: str) -> torch.Tensor:
        p = nn.Parameter(torch.ones(200_000, dtype=torch.bfloat16))
        opt = optim.SGD([p], lr=1e-4, engine=engine, param_rounding=rounding)
        for _ in range(5):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach().double() - 1.0

    nearest, stochastic = step("nearest"), step("stochastic")
    assert bool((nearest == 0).all())
    # each step moves an element by -2**-8 with probability 1e-4 / 2**-8: the mean of 200k elements after 5 steps
    # is -5e-4 with a standard deviation of about 4e-6
    assert float(stochastic.mean()) == pytest.approx(-5e-4, rel=0.05)
    assert set(torch.unique(stochastic).tolist()) <= {-k * 2.0**-8 for k in range(6)}


@pytest.mark.parametrize("name", ["AdamW", "Lion", "SGD"])
@pytest.mark.parametrize("state_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flat", [False, True])
def test_every_engine_steps_bfloat16_parameters_as_the_reference(name: str, state_dtype: torch.dtype | None,
                                                                 flat: bool) -> None:
    kw: dict[str, Any] = {"momentum": 0.9} if name == "SGD" else {"weight_decay": 0.1}
    results = {}
    for engine in ENGINES:
        if engine == "compiled" and state_dtype is None and name != "SGD":
            continue  # bfloat16 state in the parameter's dtype: bf16 arithmetic, which a compiled step widens
        params = bf16_params()
        opt = train(lambda ps, e=engine: getattr(optim, name)(ps, lr=1e-2, engine=e, state_dtype=state_dtype,
                                                             flat=flat, **kw), params, 4)
        results[engine] = (params, opt)
    ref_params, ref_opt = results.pop("reference")
    for engine, (params, opt) in results.items():
        for p, q in zip(params, ref_params):
            assert p.dtype == torch.bfloat16
            assert torch.equal(p.view(torch.int16), q.view(torch.int16)), engine
            for key, value in ref_opt.state[q].items():
                assert torch.equal(opt.state[p][key], value), (engine, key)


def test_the_native_loop_steps_bfloat16_parameters_itself() -> None:
    params = bf16_params()
    opt = train(lambda ps: optim.AdamW(ps, lr=1e-2, engine="native", state_dtype=torch.bfloat16), params, 3)
    assert [run.kernel for run in opt.last_step_kernels] == ["native"]


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_nearest_rounding_is_torch_optims_arithmetic(name: str) -> None:
    """torch.optim on bf16 weights at 1.0 with updates below half an ulp leaves them exactly as they are, and
    so does ``param_rounding="nearest"``; over larger steps it follows torch (rounding order aside)."""
    kw: dict[str, Any] = {"momentum": 0.9} if name == "SGD" else {}
    for lr, steps in ((1e-5, 5), (1e-2, 20)):
        ours, theirs = bf16_params(), bf16_params()
        if lr < 1e-3:
            for p, q in zip(ours, theirs):
                p.data.fill_(1.0)
                q.data.fill_(1.0)
        train(lambda ps, lr=lr: getattr(optim, name)(ps, lr=lr, param_rounding="nearest", **kw), ours, steps)
        train(lambda ps, lr=lr: getattr(torch.optim, name)(ps, lr=lr, foreach=False, **kw), theirs, steps)
        for p, q in zip(ours, theirs):
            if lr < 1e-3:
                assert bool((p == 1).all()) and bool((q == 1).all())
            else:
                torch.testing.assert_close(p.float(), q.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("into", ["reference", "native", "compiled"])
def test_a_resumed_run_equals_an_uninterrupted_one(into: str) -> None:
    """The noise is a hash of step, position and slot: no generator state to save, and a state_dict round trip
    (into another engine) continues the run bit for bit."""
    def make(engine: str) -> Callable[..., torch.optim.Optimizer]:
        return lambda ps: optim.Lion(ps, lr=1e-3, engine=engine, state_dtype=torch.bfloat16, weight_decay=0.1)

    straight = bf16_params()
    train(make("foreach"), straight, 6)
    first = bf16_params()
    opt = train(make("foreach"), first, 3)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    again = make(into)(resumed)
    again.load_state_dict(saved)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in resumed]
        if step < 3:
            continue
        for p, g in zip(resumed, grads):
            p.grad = g
        again.step()
    for p, q in zip(resumed, straight):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    assert again.state_dict()["state"][0]["exp_avg"].dtype == torch.bfloat16


def test_torch_kernels_are_not_used_for_stochastically_rounded_parameters() -> None:
    """torch's fused kernels round to nearest: engine="fused" hands such buckets to the foreach engine."""
    for rounding, kernel in (("stochastic", "foreach"), ("nearest", "fused")):
        params = bf16_params()
        opt = train(lambda ps, r=rounding: optim.AdamW(ps, lr=1e-2, engine="fused", param_rounding=r), params, 2)
        assert {run.kernel for run in opt.last_step_kernels} == {kernel}


def test_float16_parameters_keep_torchs_arithmetic() -> None:
    results = []
    for rounding in ("stochastic", "nearest"):
        p = nn.Parameter(torch.linspace(-1, 1, 999).to(torch.float16))
        opt = optim.AdamW([p], lr=1e-3, param_rounding=rounding)
        for _ in range(3):
            p.grad = torch.cos(torch.arange(999.0)).to(torch.float16)
            opt.step()
        results.append(p.detach())
    assert torch.equal(*results)


def test_param_rounding_is_checked_and_kept_by_copies() -> None:
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="param_rounding must be one of 'stochastic', 'nearest'"):
        optim.AdamW([p], param_rounding="up")
    opt = optim.Lion([p], param_rounding="nearest")
    assert pickle.loads(pickle.dumps(opt)).param_rounding == "nearest"
    assert copy.deepcopy(optim.Lion([p])).param_rounding == "stochastic"


@pytest.mark.parametrize("rounding,picked", [("stochastic", "foreach"), ("nearest", "fused")])
def test_auto_off_the_cpu_never_picks_torchs_kernel_for_stochastic_rounding(monkeypatch: pytest.MonkeyPatch,
                                                                            rounding: str, picked: str) -> None:
    """The device logic of ``--param-dtype bfloat16 --device cuda``, on the CPU: a bucket of bf16 parameters on
    a device with torch's fused kernels (here ``meta`` stands in for CUDA) goes to the foreach engine under
    stochastic rounding, to torch's fused AdamW under nearest rounding."""
    from descend.optim.engines import fused
    from descend.optim.engines.auto import AutoEngine
    from descend.optim.engines.bucket import Bucket, Item
    from descend.optim.engines.plan import active_rules, weight_factor

    monkeypatch.setattr(fused, "FUSED_DEVICES", (*fused.FUSED_DEVICES, "meta"))
    p = nn.Parameter(torch.empty(8, dtype=torch.bfloat16, device="meta"))
    opt = optim.AdamW([p], lr=1e-3, weight_decay=0.1, param_rounding=rounding)
    plan, group = opt.plan(), opt.param_groups[0]
    engine = AutoEngine(plan, opt)
    states = [torch.empty_like(p) for _ in range(2)]
    bucket = Bucket(0, group, active_rules(plan, group, None), weight_factor(plan, group),
                    [Item(p, torch.empty_like(p), states)], [p], torch.tensor(1.0), None)
    assert engine.engine_for(bucket).name == picked


@pytest.mark.parametrize("engine", ["reference", "native", "auto"])
def test_the_default_state_of_a_bfloat16_parameter_is_bfloat16_rounded_stochastically(engine: str) -> None:
    """``state_dtype=None`` keeps a bfloat16 parameter's state in bfloat16, stored as ``state_dtype=torch.bfloat16``
    stores it (updated in float32, rounded stochastically): the same weights and state bit for bit, and the native
    loop steps it (a bfloat16 model needs no option for the fast path)."""
    default = train(lambda p: optim.AdamW(p, lr=1e-3, engine=engine), bf16_params(), steps=4)
    explicit = train(lambda p: optim.AdamW(p, lr=1e-3, engine="reference", state_dtype=torch.bfloat16),
                     bf16_params(), steps=4)
    pairs = zip(default.param_groups[0]["params"], explicit.param_groups[0]["params"])
    for p, q in pairs:
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = default.state[p][key], explicit.state[q][key]
            assert a.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16))
    if engine != "reference":
        assert {run.kernel for run in default.last_step_kernels} == {"native"}
