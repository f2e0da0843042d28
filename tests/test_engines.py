"""Every engine against the reference engine, and the step features they share (AMP, bf16 state)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from descend import optim
from descend.optim.engines import compiled
from descend.optim.engines import plan as plan_module
from descend.optim.engines.auto import AutoEngine
from descend.optim.engines.foreach import ForeachEngine
from descend.optim.engines.store import (
    Store,
    element_noise,
    mix32,
    mix32_word,
    rounding_seeds,
    stochastic_round,
    store_for,
)
from descend.optim.engines.tensorlist import TensorList

SHAPES = [(3, 4), (5,), (2, 3, 2), (0,), (7,), (4, 1)]

PRESETS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd_nesterov_l2": lambda g, **k: optim.SGD(g, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01, **k),
    "sgd_plain": lambda g, **k: optim.SGD(g, lr=0.01, **k),
    "momentum": lambda g, **k: optim.Momentum(g, **k),
    "signsgd": lambda g, **k: optim.SignSGD(g, weight_decay=0.1, **k),
    "signum_box": lambda g, **k: optim.Signum(g, weight_decay=0.1, constraint="box", radius=0.5, **k),
    "softsign_clip": lambda g, **k: optim.Softsign(g, max_grad_norm=1.0, **k),
    "lion_maximize": lambda g, **k: optim.Lion(g, weight_decay=0.1, maximize=True, **k),
    "adam_amsgrad_ball": lambda g, **k: optim.Adam(g, amsgrad=True, weight_decay=0.01, constraint="ball",
                                                   radius=1.0, **k),
    "adamw": lambda g, **k: optim.AdamW(g, **k),
    "user_chain": lambda g, **k: optim.chain(g, optim.ema(0.9), optim.softsign(1e-3), optim.decoupled_decay(0.1),
                                             lr=0.01, **k),
}


@contextlib.contextmanager
def compile_backend(backend: Any) -> Iterator[None]:
    """Compiled steps built inside the block use ``backend`` (None: inductor, as in use)."""
    with pytest.MonkeyPatch.context() as patch:
        if backend is not None:
            patch.setattr(compiled, "BACKEND", backend)
        yield


def kernels(opt: Any) -> list[str]:
    """The kernels that stepped the last step's buckets (the public report), sorted."""
    return sorted(run.kernel for run in opt.last_step_kernels)


def run(factory: Callable[..., torch.optim.Optimizer], engine: str, *, steps: int = 20,
        dtype: torch.dtype = torch.float32, backend: Any = None, stepper: Any = None, after_step: Any = None,
        **kw: Any) -> list[torch.Tensor]:
    """``steps`` steps on mixed shapes in two groups (different lr), one parameter sometimes without grad.

    ``stepper(opt)``: an engine built for ``opt`` that takes the steps instead of ``opt.step``;
    ``after_step(opt)`` is called after each step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]
    groups = [{"params": params[:3]}, {"params": params[3:], "lr": 0.003}]
    opt = factory(groups, engine=engine, **kw)
    step = torch.no_grad()(stepper(opt).step) if stepper is not None else opt.step
    with compile_backend(backend):
        for t in range(steps):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
                p.grad = None if (i == 4 and t % 3 == 0) else g
            step()
            if after_step is not None:
                after_step(opt)
    return [p.detach() for p in params]


def assert_close(out: list[torch.Tensor], ref: list[torch.Tensor], rtol: float = 1e-6) -> None:
    for a, b in zip(out, ref):
        if b.numel():
            err = float((a.double() - b.double()).abs().max() / (b.double().abs().max() + 1e-12))
            assert err <= rtol, f"relative error {err:.2e} > {rtol}"


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_matches_reference(name: str, dtype: torch.dtype) -> None:
    assert_close(run(PRESETS[name], "foreach", dtype=dtype), run(PRESETS[name], "reference", dtype=dtype))


@pytest.mark.parametrize("name", ["adamw", "lion_maximize", "sgd_nesterov_l2"])
def test_foreach_bf16_params_match_reference(name: str) -> None:
    out = run(PRESETS[name], "foreach", dtype=torch.bfloat16)
    ref = run(PRESETS[name], "reference", dtype=torch.bfloat16)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_foreach_chunks_large_tensors_like_whole_ones() -> None:
    """The foreach engine cuts contiguous tensors into flat chunks; the chunk size cannot change the result."""
    outs = []
    for chunk in (7, 1 << 20):
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(10, 3), (4,), (33,)]]
        opt = optim.AdamW(params, engine="foreach")
        engine = ForeachEngine(opt.plan(), opt, chunk=chunk)  # the optimizer's own, with a chunk size
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            with torch.no_grad():
                engine.step()
        outs.append([p.detach().clone() for p in params])
    assert_close(outs[0], outs[1], rtol=0.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_foreach_scratch_path_matches_fresh_temporaries(name: str) -> None:
    """Temporaries in scratch buffers (large tensors) or fresh from ``_foreach_*`` (small): same steps."""
    outs = [run(PRESETS[name], "foreach", stepper=lambda opt, m=min_mean: ForeachEngine(opt.plan(), opt,
                                                                                         scratch_min_mean=m))
            for min_mean in (0, 1 << 30)]  # always the scratch, never the scratch
    assert_close(outs[0], outs[1], rtol=0.0)


@pytest.mark.parametrize("engine", ["reference", "foreach", "compiled", "fused"])
def test_each_engine_steps_with_its_own_kernel(engine: str) -> None:
    """The report names the engine's kernel for every bucket after the first step (which creates the state
    on the reference path), one entry per param group and bucket."""
    p = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = optim.Adam([{"params": p[:1]}, {"params": p[1:], "lr": 0.1}], engine=engine)
    assert opt.last_step_kernels == ()
    with compile_backend(CountingBackend()):
        for step in range(2):
            for q in p:
                q.grad = torch.ones_like(q)
            opt.step()
            kernel = "reference" if step == 0 else engine
            assert [(r.group, r.kernel, r.tensors) for r in opt.last_step_kernels] == [(0, kernel, 1), (1, kernel, 1)]
    with pytest.raises(ValueError, match="engine must be one of"):
        optim.Adam(p, engine="fast")


# -- the compiled engine --------------------------------------------------------------------------
class CountingBackend:
    """A ``torch.compile`` backend that counts compilations and runs the traced graph eagerly."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        self.compiles += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _traced_compiles() -> Iterator[None]:
    """The compiled engine runs its traced graph eagerly here, unless a test asks for inductor."""
    with compile_backend(CountingBackend()):
        yield


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_compiled_graph_matches_reference(name: str) -> None:
    """The traced chain (no inductor: fast) computes what the reference does, with 0-d tensor hyperparameters."""
    backend = CountingBackend()
    assert_close(run(PRESETS[name], "compiled", backend=backend), run(PRESETS[name], "reference"))
    assert backend.compiles >= 1


def test_scheduler_causes_no_recompile() -> None:
    backend = CountingBackend()
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (5,)]]
    opt = optim.AdamW(params, lr=1e-2, weight_decay=0.1, engine="compiled")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=101, cycle_momentum=False)
    with compile_backend(backend):
        for _ in range(100):
            for p in params:
                p.grad = torch.randn(p.shape)
            opt.step()
            sched.step()
            opt.param_groups[0]["weight_decay"] *= 0.99  # a scheduled weight decay: still no recompile
    assert backend.compiles == 1 and kernels(opt) == ["compiled"]


def test_compile_failure_warns_once_and_falls_back() -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        raise RuntimeError("no C++ compiler here")

    ref = run(PRESETS["adamw"], "reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(PRESETS["adamw"], "compiled", backend=broken)
    messages = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(messages) == 1
    assert_close(out, ref)


@pytest.fixture(scope="module")
def inductor_run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One real inductor-compiled AdamW run (compiled once for the module; tens of seconds on 2 cores)."""
    factory = PRESETS["adam_amsgrad_ball"]
    return run(factory, "compiled", backend="inductor", steps=10), run(factory, "reference", steps=10)


@pytest.mark.slow
def test_inductor_matches_reference(inductor_run: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    out, ref = inductor_run
    assert_close(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_inductor_every_preset(name: str) -> None:
    assert_close(run(PRESETS[name], "compiled", backend="inductor", steps=8), run(PRESETS[name], "reference", steps=8))


# -- state and step protocol ------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["foreach", "compiled"])
def test_load_state_dict_resumes_identically(engine: str) -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=gen) for s in [(3,), (2, 2)]] for _ in range(6)]

    def make() -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        params = [torch.nn.Parameter(torch.ones(s)) for s in [(3,), (2, 2)]]
        return params, optim.Adam(params, lr=0.1, engine=engine)

    params, opt = make()
    for t in range(6):
        if t == 3:
            saved = copy.deepcopy(opt.state_dict())
            saved_params = [p.detach().clone() for p in params]
        for p, g in zip(params, grads[t]):
            p.grad = g
        opt.step()
    params2, opt2 = make()
    with torch.no_grad():
        for p, v in zip(params2, saved_params):
            p.copy_(v)
    opt2.load_state_dict(saved)
    for t in range(3, 6):
        for p, g in zip(params2, grads[t]):
            p.grad = g
        opt2.step()
    assert_close([p.detach() for p in params2], [p.detach() for p in params], rtol=1e-7)


def test_tensorlist_rejects_unknown_torch_function() -> None:
    with pytest.raises(TypeError, match="TensorList does not implement"):
        torch.tanh(TensorList([torch.zeros(2)]))


# -- mixed precision: GradScaler protocol -----------------------------------------------------------
@pytest.mark.parametrize("engine", ["auto", "reference", "foreach", "native", "compiled"])
def test_grad_scaler_matches_unscaled_and_skips_inf(engine: str) -> None:
    def train(scaled: bool) -> tuple[list[torch.Tensor], dict[str, Any]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, engine=engine)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        for t in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if scaled and t == 3:  # an overflowing step: must change nothing
                before = ([p.detach().clone() for p in model.parameters()],
                          {k: v.clone() for k, v in opt.state[next(model.parameters())].items()})
                next(model.parameters()).grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
                for p, b in zip(model.parameters(), before[0]):
                    assert torch.equal(p.detach(), b)
                for k, v in opt.state[next(model.parameters())].items():
                    assert torch.equal(v, before[1][k]), k
                continue
            scaler.step(opt)
            scaler.update()
        return [p.detach() for p in model.parameters()], {}

    scaled, _ = train(True)
    # The unscaled run takes the same steps, skipping step 3 likewise.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0, engine="reference")
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for t in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if t != 3:
            opt.step()
    assert_close(scaled, [p.detach() for p in model.parameters()])


def test_grad_scaler_unscale_then_clip_matches_torch_adamw() -> None:
    """torch's AMP recipe with clipping (``scaler.unscale_``, ``clip_grad_norm_``, ``scaler.step``), an
    overflowing step included: descend's AdamW follows torch's, as Lightning and HF Trainer run it."""
    results = []
    for make in (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: optim.AdamW(p, lr=1e-2)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        for t in range(8):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if t == 3:
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
        results.append([p.detach() for p in model.parameters()])
        assert scaler.get_scale() == 2.0**11  # halved once, at the overflow
    assert_close(results[1], results[0], rtol=1e-6)


def test_step_accepts_grad_scale_and_found_inf_directly() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = optim.SGD([p], lr=0.5)
    p.grad = torch.full((3,), 8.0)
    opt.step(grad_scale=torch.tensor(4.0))
    torch.testing.assert_close(p.detach(), torch.zeros(3))  # 1 - 0.5 * 8/4
    opt.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor([1.0]))
    torch.testing.assert_close(p.detach(), torch.zeros(3))
    assert p.grad is not None and torch.equal(p.grad, torch.full((3,), 8.0))  # .grad left as it was


# -- bf16 state and stochastic rounding -------------------------------------------------------------
def test_stochastic_rounding_is_unbiased() -> None:
    torch.manual_seed(0)
    x = torch.tensor([1.0 + 2.0**-10, -3.14159, 1e-3 + 1e-7, 0.1, 65504.3])
    many = x.repeat(200_000, 1)
    rounded = stochastic_round(many).float()
    assert torch.all(torch.isin(rounded[:, 0], torch.tensor([1.0, 1.0078125])))  # the two neighbours
    mean = rounded.double().mean(0)
    ulp = (x.abs() * 2.0**-7).double()
    assert torch.all((mean - x.double()).abs() < 0.01 * ulp)  # within 1% of an ulp: unbiased
    nearest = many.to(torch.bfloat16).float().double().mean(0)
    assert (nearest[0] - x[0]).abs() > 0.1 * ulp[0]  # round-to-nearest is biased for this value


def test_hash_noise_rounding_is_unbiased() -> None:
    """The optimizer's rounding (index-hash noise, one seed) is unbiased over many elements too."""
    x = torch.tensor([1.0 + 2.0**-10, -3.14159, 1e-3 + 1e-7, 0.1, 65504.3])
    many = x.repeat(200_000, 1)
    for seed in (0, 123456789):
        rounded = stochastic_round(many, noise=element_noise(seed, many)).float()
        mean = rounded.double().mean(0)
        ulp = (x.abs() * 2.0**-7).double()
        assert torch.all((mean - x.double()).abs() < 0.01 * ulp)


def test_stochastic_rounding_keeps_non_finite() -> None:
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    out = stochastic_round(x).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and torch.isnan(out[2])
    assert out[3] == 0 and out[4] == 0


@pytest.mark.parametrize("engine", ["reference", "foreach", "compiled"])
def test_bf16_state_is_bf16_and_tracks_fp32(engine: str) -> None:
    """bf16 state takes 2 bytes per value and, with stochastic rounding, follows a small-step EMA."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(20_000))
    opt = optim.Signum([p], lr=1e-3, beta=0.999, engine=engine, state_dtype=torch.bfloat16)
    g = torch.full((20_000,), 1.0)
    for _ in range(300):
        p.grad = g
        opt.step()
    m = opt.state[p]["exp_avg"]
    assert m.dtype == torch.bfloat16 and m.element_size() == 2
    exact = 1 - 0.999**300  # the fp32 EMA of a constant gradient 1
    assert abs(float(m.float().mean()) - exact) < 0.01 * exact


def test_bf16_state_with_plain_rounding_would_stall() -> None:
    """Why stochastic rounding: round-to-nearest bf16 stops the EMA 0.999*m + 0.001 near m = 0.25."""
    m = torch.zeros(1, dtype=torch.bfloat16)
    for _ in range(3000):
        m = torch.lerp(m, torch.ones(1, dtype=torch.bfloat16), 0.001)
    assert float(m) < 0.5 < 1 - 0.999**3000


@pytest.mark.parametrize("name", [pytest.param("lion", marks=pytest.mark.slow), "signum"])
def test_bf16_state_training_run_matches_fp32(name: str) -> None:
    """A small regression trained with bf16 state ends within 15% (+0.005) of the fp32-state loss."""
    def train(state_dtype: torch.dtype | None) -> float:
        torch.manual_seed(0)
        x = torch.randn(256, 8)
        y = torch.sin(x @ torch.randn(8, 1))
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        cls = optim.Lion if name == "lion" else optim.Signum
        opt = cls(model.parameters(), lr=3e-3, weight_decay=0.01,
                  engine="foreach", state_dtype=state_dtype)
        for _ in range(200):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x), y))

    fp32, bf16 = train(None), train(torch.bfloat16)
    assert bf16 < 0.25, bf16  # it trained (the target variance is about 0.5)
    assert abs(bf16 - fp32) <= 0.15 * fp32 + 0.005, (fp32, bf16)


def test_zero_size_and_no_grad_params_are_fine() -> None:
    for engine in ("foreach", "compiled"):
        a, b = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.ones(2))
        opt = optim.Lion([a, b], engine=engine)
        a.grad = torch.zeros(0)
        opt.step()
        opt.step()
        assert torch.equal(b.detach(), torch.ones(2))


@pytest.mark.parametrize("engine", ["foreach", "compiled"])
def test_step_counters_count_each_parameters_own_steps(engine: str) -> None:
    """Counters packed into one tensor per bucket still count per parameter, as torch.optim's do.

    A parameter that skips steps (no gradient) keeps its count; a state_dict round trip, a
    counter changed by hand and a new param group are all followed.
    """
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(4)]
    opt = optim.Adam(params, lr=0.1, engine=engine)
    expected = [0, 0, 0, 0]
    for t in range(9):
        for i, p in enumerate(params):
            p.grad = None if (i == 2 and t % 3 == 1) else torch.full((3,), float(t + 1))
            expected[i] += p.grad is not None
        opt.step()
        assert [float(opt.state[p]["step"]) for p in params] == expected
        if t == 4:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if t == 6:
            opt.state[params[0]]["step"] = torch.tensor(100.0)
            expected[0] = 100
    steps = [opt.state[p]["step"] for p in params]
    assert all(s.dim() == 0 for s in steps)
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra]})
    for _ in range(2):
        for p in [*params, extra]:
            p.grad = torch.ones(p.shape)
        opt.step()
    assert [float(opt.state[p]["step"]) for p in [*params, extra]] == [e + 2 for e in expected] + [2]


# -- foreach scratch buffers and per-step scalars -----------------------------------------------------
def test_tensorlist_with_scratch_matches_fresh_results() -> None:
    """Temporaries written into reused scratch buffers hold what fresh ``_foreach_*`` results hold."""
    from descend.optim.engines.tensorlist import Scratch

    gen = torch.Generator().manual_seed(5)
    xs = [torch.rand(s, generator=gen) + 0.1 for s in [(3, 4), (5,), (2, 2)]]
    ys = [torch.rand(x.shape, generator=gen) + 0.1 for x in xs]

    def expr(a: TensorList, b: TensorList) -> TensorList:
        return torch.sign(torch.lerp(a, b, 0.3)) * 2 + (a * b).sqrt() / (1 - b) - a.abs() / 3.0 + 1 / b

    scratch = Scratch(64, min_mean=0)  # small tensors would bypass the scratch otherwise
    scratch.reset()
    out = expr(TensorList(xs, scratch), TensorList(ys, scratch))
    ref = expr(TensorList(xs), TensorList(ys))
    for a, b in zip(out.tensors, ref.tensors):
        torch.testing.assert_close(a, b)
    held = len(scratch.buffers[(torch.float32, torch.device("cpu"))])
    assert held <= 13  # at most one buffer per operation of the expression
    scratch.reset()
    expr(TensorList(xs, scratch), TensorList(ys, scratch))
    assert len(scratch.buffers[(torch.float32, torch.device("cpu"))]) == held  # reused, not grown


def test_the_seed_hash_on_python_integers_is_the_tensor_hash() -> None:
    """mix32_word (Python integers, the eager path) and mix32 (tensor operations, what torch.compile traces)
    give the same bits on every kind of word, and so rounding_seeds does on both paths."""
    gen = torch.Generator().manual_seed(0)
    words = torch.cat([torch.randint(-(2**31), 2**31, (20_000,), dtype=torch.int32, generator=gen),
                       torch.tensor([0, 1, -1, 2**31 - 1, -(2**31)], dtype=torch.int32)])
    as_signed = [w - (1 << 32) if w >> 31 else w for w in (mix32_word(int(x)) for x in words)]
    assert torch.equal(torch.tensor(as_signed, dtype=torch.int32), mix32(words))

    traced = torch.compile(rounding_seeds, backend="eager", fullgraph=True)
    ordinals = [0, 1, 7, 1000, 2**20]
    for step in (torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0e6, dtype=torch.float64)):
        for slot in (-1, 0, 1, 17, 33):
            assert torch.equal(traced(step, ordinals, slot), rounding_seeds(step, ordinals, slot))


def test_hash_noise_is_uniform_and_unrelated_across_steps_and_neighbours() -> None:
    """16-bit noise from the index hash: uniform bins, no correlation between steps, parameters or neighbours."""
    like = torch.empty(1 << 16)
    seeds = rounding_seeds(torch.tensor(7.0), [0, 1], 0)
    a, b = (element_noise(int(seed), like).double() for seed in seeds)  # two parameters, same step
    c = element_noise(int(rounding_seeds(torch.tensor(8.0), [0], 0)), like).double()
    d = element_noise(int(rounding_seeds(torch.tensor(7.0), [0], 1)), like).double()
    assert a.min() >= 0 and a.max() < 65536
    counts = torch.bincount((a // 256).long(), minlength=256).double()  # 256 equal bins of 256 values
    chi2 = float(((counts - 256) ** 2 / 256).sum())
    assert chi2 < 350  # 255 degrees of freedom: P(chi2 > 350) < 1e-4 for uniform noise
    assert abs(float(a.mean()) - 32767.5) < 0.01 * 65536
    for other in (b, c, d, a.roll(1)):  # another parameter, the next step, another state slot, the neighbour
        assert abs(float(torch.corrcoef(torch.stack([a, other]))[0, 1])) < 0.02


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("backend", ["traced", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["lion", "signum", "adamw"])
def test_bf16_state_is_the_same_under_every_engine(name: str, backend: str, flat: bool) -> None:
    """Rounding noise is a hash of (step, parameter, element), so the engines write the same bf16 state.

    Only elements whose float32 value differs by rounding between engines (lerp/FMA order) can land
    on the other bf16 neighbour; the foreach engine's chunking changes nothing at all. With
    ``flat=True`` the fused engines step the whole buffer (the compiled one indexing it by row and
    lane) and still draw the noise the reference engine draws for each parameter alone (its
    buffer's ordinal and its offset in the buffer).
    """
    factory = {"lion": optim.Lion, "signum": optim.Signum, "adamw": optim.AdamW}[name]

    def states(engine: str, **kw: Any) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(64, 33), (1000,), (7, 5, 3)]]
        opt = factory(params, lr=1e-3, engine=engine, state_dtype=torch.bfloat16, flat=flat, **kw)
        counter = CountingBackend()
        with compile_backend(counter if backend == "traced" else "inductor"):
            for _ in range(20):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
        assert kernels(opt) == [engine] * len(kernels(opt))  # not fallen back to foreach
        if engine == "compiled" and backend == "traced":
            assert counter.compiles == 1  # new seeds every step are tensor inputs: no recompile
        return [t for p in params for k, t in sorted(opt.state[p].items()) if k != "step"]

    ref = states("reference")
    for engine in ("foreach", "compiled", "native"):
        out = states(engine)
        same = sum(int((a == b).sum()) for a, b in zip(out, ref)) / sum(a.numel() for a in ref)
        assert same > 0.999, (engine, same)
        for a, b in zip(out, ref):  # where they differ, by one bf16 step at most
            assert torch.allclose(a.float(), b.float(), rtol=2**-7, atol=1e-30)


def test_bf16_state_foreach_chunking_changes_nothing() -> None:
    outs = []
    for chunk in (7, 1 << 20):
        gen = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(10, 3), (4,), (33,)]]
        opt = optim.Signum(params, lr=1e-2, engine="foreach", state_dtype=torch.bfloat16)
        engine = ForeachEngine(opt.plan(), opt, chunk=chunk)  # the optimizer's own, with a chunk size
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            with torch.no_grad():
                engine.step()
        outs.append([opt.state[p]["exp_avg"] for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("engine", ["reference", "foreach", "native"])
def test_bf16_state_resumes_bit_identically(engine: str, flat: bool) -> None:
    """No generator state to save: a resumed run rounds as the uninterrupted one did (also with
    ``flat=True``, where the loaded state is moved into the flat buffers again)."""
    def make() -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        params = [torch.nn.Parameter(torch.ones(50, 7)), torch.nn.Parameter(torch.ones(300))]
        return params, optim.Lion(params, lr=1e-3, engine=engine, state_dtype=torch.bfloat16, flat=flat)

    def grads(t: int, params: list[torch.nn.Parameter]) -> None:
        gen = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)

    params, opt = make()
    for t in range(10):
        grads(t, params)
        opt.step()
    params2, opt2 = make()
    for t in range(5):
        grads(t, params2)
        opt2.step()
    saved = (copy.deepcopy(opt2.state_dict()), [p.detach().clone() for p in params2])
    params3, opt3 = make()
    with torch.no_grad():
        for p, w in zip(params3, saved[1]):
            p.copy_(w)
    opt3.load_state_dict(saved[0])
    torch.manual_seed(12345)  # torch's generator plays no part
    for t in range(5, 10):
        grads(t, params3)
        opt3.step()
    assert all(torch.equal(a, b) for a, b in zip(params, params3))
    assert all(torch.equal(opt.state[a]["exp_avg"], opt3.state[b]["exp_avg"]) for a, b in zip(params, params3))


def test_adam_bias_corrections_come_from_the_scalars_hook() -> None:
    rule = optim.scale_by_adam((0.9, 0.999))
    s = rule.scalars({"betas": (0.9, 0.999)}, 3)
    assert s["bias1"] == pytest.approx(1 - 0.9**3) and s["bias2_sqrt"] == pytest.approx((1 - 0.999**3) ** 0.5)


# -- engine="auto" -----------------------------------------------------------------------------------------
def _auto_run(factory: Callable[..., torch.optim.Optimizer], steps: int = 5, **kw: Any) -> torch.optim.Optimizer:
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (5,)]]
    opt = factory(params, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


@pytest.mark.parametrize("name", ["adamw", "sgd_nesterov_l2", "sgd_plain", "adam_amsgrad_ball", "lion_maximize",
                                  "softsign_clip", "user_chain"])
def test_auto_runs_every_chain_as_the_native_loop_on_the_cpu(name: str) -> None:
    """On the CPU every chain, torch's Adam, AdamW and SGD included, runs as the native loop."""
    assert kernels(_auto_run(PRESETS[name])) == ["native"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adamw_steps_as_torch_fused_adamw(dtype: torch.dtype) -> None:
    """After the first step (the reference path), ``fused=True`` is torch's fused AdamW kernel: bit for bit."""
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=dtype)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = optim.AdamW(ours, lr=1e-2, weight_decay=0.1, fused=True)
    b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
    for t in range(6):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            q.grad = p.grad.clone()
        a.step()
        b.step()
        if t == 0:  # align the one step the two compute in a different order
            for p, q in zip(ours, theirs):
                q.data.copy_(p.data)
                for key in ("exp_avg", "exp_avg_sq"):
                    b.state[q][key].copy_(a.state[p][key])
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def _auto_without_native(compile_min: int, backend: Any, **kw: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Lion stepped by ``engine="auto"`` where there is no native engine (as without a C compiler, or off the
    CPU): the kernels of the last step and the parameters, stepped as ``_auto_run`` steps them."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (5,)]]
    opt = optim.Lion(params, weight_decay=0.1, **kw)
    engine = AutoEngine(opt.plan(), opt, native=None, compile_min=compile_min)
    with compile_backend(backend):
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            with torch.no_grad():
                engine.step()
    return sorted(run.kernel for run in engine.report), [p.detach() for p in params]


def _lion_reference() -> list[torch.Tensor]:
    ref = _auto_run(lambda p, **kw: optim.Lion(p, weight_decay=0.1, engine="reference"))
    return [p.detach() for p in ref.param_groups[0]["params"]]


def test_auto_compiles_large_flat_buffers_only() -> None:
    backend = CountingBackend()
    ran, _ = _auto_without_native(20, backend)  # two tensors: not flat, so no compile however large
    assert backend.compiles == 0 and ran == ["foreach"]
    ran, out = _auto_without_native(20, backend, flat=True)
    assert backend.compiles == 1 and ran == ["compiled"]
    assert_close(out, _lion_reference())


def test_auto_logs_a_compile_failure_and_steps_with_foreach(caplog: pytest.LogCaptureFixture) -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        raise RuntimeError("no C++ compiler here")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silent: no warning reaches the user
        with caplog.at_level("INFO", logger="descend.optim"):
            ran, out = _auto_without_native(0, broken, flat=True)
    assert any("falling back" in r.message for r in caplog.records) and ran == ["foreach"]
    assert_close(out, _lion_reference())


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_auto_behaves_as_torch_optim(name: str) -> None:
    """zero_grad(set_to_none), a parameter without gradient, a frozen one, ``model.to()`` after construction and
    a state_dict round trip with torch.optim: descend's default and torch's default take the same steps."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    unused = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    kw = {"lr": 1e-2, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2}
    ours = getattr(optim, name)([*models[0].parameters(), unused[0]], **kw)
    theirs = getattr(torch.optim, name)([*models[1].parameters(), unused[1]], **kw)
    for m in models:
        m[0].bias.requires_grad_(False)  # frozen after construction
        m.to(torch.float64)  # moved after construction
    x = torch.randn(8, 4, dtype=torch.float64)
    for t in range(8):
        for model, opt in zip(models, (ours, theirs)):
            opt.zero_grad()
            assert all(p.grad is None for p in model.parameters())
            model(x).pow(2).mean().backward()
            opt.step()
        if t == 3:  # swap states through each other's state_dict
            ours_sd, theirs_sd = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
            ours.load_state_dict(theirs_sd)
            theirs.load_state_dict(ours_sd)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q)
        assert p.dtype == torch.float64
    assert unused[0] not in ours.state and models[0][0].bias not in ours.state


def test_auto_falls_back_where_torch_compile_itself_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where dynamo is unsupported ``torch.compile`` raises at once: the step still runs, on foreach."""
    def unsupported(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ran, out = _auto_without_native(0, None, flat=True)
    assert ran == ["foreach"]
    assert_close(out, _lion_reference())


def test_the_bf16_store_in_buffers_equals_its_expression() -> None:
    """The bf16 store draws the same noise and rounds the same way in caller-owned buffers (the foreach
    engine's scratch) as without them (the reference and compiled engines), non-finite values included."""
    store = store_for(torch.bfloat16)
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1.0 + 2.0**-10, -3.14159])
    x = torch.cat([x, torch.randn(1000, generator=torch.Generator().manual_seed(0))])
    for seed, offset in [(0, 0), (-123456789, 0), (987654321, 2**20 + 3)]:
        dst, expected = (torch.empty(x.shape, dtype=torch.bfloat16) for _ in range(2))
        store.store_(dst, x, seed, offset, buffers=[torch.empty(x.shape, dtype=d) for d in store.scratch_dtypes()])
        store.store_(expected, x, seed, offset)
        out = dst.float()
        assert out[0] == float("inf") and out[1] == float("-inf") and torch.isnan(out[2])
        assert out[3] == 0 and out[4] == 0 and out[5] in (1.0, 1.0078125)
        assert abs(float(out[6]) + 3.14159) < 0.02
        assert torch.equal(dst[~x.isnan()], expected[~x.isnan()]) and expected[2].isnan()


class _HalfStore(Store):
    """A second storage format, as a test defines one: float16 state updated in float32, rounded once on store."""

    def __init__(self) -> None:
        super().__init__(torch.float16)
        self.as_is, self.c_type = False, None  # no C expression: the native engine leaves it to foreach

    def load(self, stored: Any) -> Any:
        return stored.to(torch.float32)

    def store_(self, stored: torch.Tensor, work: torch.Tensor, seed: Any = 0, offset: int = 0, **kw: Any) -> None:
        stored.copy_(work)


@pytest.mark.parametrize("name", ["adamw", "signum_box", "sgd_nesterov_l2"])
def test_a_new_store_is_one_class_and_every_engine_uses_it(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A format added as one more :class:`Store` (no engine changed) runs in every engine, each equal to the
    reference engine bit for bit; Adam's differs from keeping float16 state as it is (rounding every operation)."""
    half = _HalfStore()
    plain = run(PRESETS[name], "reference", state_dtype=torch.float16)
    monkeypatch.setattr(plan_module, "store_for", lambda dtype: half if dtype == torch.float16 else store_for(dtype))
    ref = run(PRESETS[name], "reference", state_dtype=torch.float16)
    for engine in ("foreach", "compiled", "native", "auto"):
        assert_close(run(PRESETS[name], engine, state_dtype=torch.float16), ref, rtol=0.0)
    if name == "adamw":  # the store took effect (a sign method's weights may not show it)
        assert any(not torch.equal(a, b) for a, b in zip(ref, plain))
