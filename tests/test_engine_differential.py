"""Every engine against the reference engine on generated optimizers, parameters, gradients and schedules.

Hypothesis draws an optimizer (a preset, or a random chain of the rules, with float, bfloat16 or 8-bit state,
bfloat16 parameters rounded stochastically or to nearest), a
parameter set (0-d, empty, sizes around the native loop's thread threshold and vector width, several
groups, non-contiguous and channels_last layouts, views of one buffer that may overlap), gradients with
NaN, +-inf, +-0 and None, hyperparameter changes between steps (numbers and tensors, as schedulers set
them), a state_dict round trip into another engine, a loss scale and a thread count. Each step, every
engine must equal the reference engine bit for bit (NaN where it has NaN, the sign of zero included), or
raise the error it raises. Adam's division and square root are the one exception the docs name: its
update within one unit in the last place, so a parameter within 2 ulps of its step or of itself, per step
(the engines are then set to the reference's values, so the bound is per step, not accumulated).

torch's fused kernels (``engine="fused"``) compute in another order and are held to torch.optim's
kernels instead (``tests/test_engines.py``); the compiled engine runs here on an eager backend (the traced
graph, without inductor's code generation, which ``tests/test_engines.py`` covers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from descend import optim
from descend.optim._chain import ENGINES
from descend.optim.engines import compiled
from descend.optim.engines.native.emit import PARALLEL_MIN
from descend.optim.rules.base import Rule
from descend.optim.rules.normalised import ScaleByAdam

# -- optimizers ----------------------------------------------------------------------------------------------
UNIT = st.sampled_from([0.0, 0.5, 0.9, 0.99])
BETAS = st.tuples(UNIT, st.sampled_from([0.0, 0.9, 0.999]))
DECAY = st.sampled_from([0.0, 0.01, 0.5])

#: The rules a random chain draws from: name -> strategy of a factory that builds the rule afresh.
TRANSFORMS: dict[str, st.SearchStrategy[Callable[[], Rule]]] = {
    "ema": UNIT.map(lambda b: lambda: optim.ema(b)),
    "heavy_ball": st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.1]), st.booleans()).map(
        lambda a: lambda: optim.heavy_ball(a[0], a[1], a[2] and a[0] > 0 and a[1] == 0)),
    "sign": st.just(optim.sign),
    "softsign": st.sampled_from([1e-8, 1e-3, 0.5]).map(lambda e: lambda: optim.softsign(e)),
    "adam": st.tuples(BETAS, st.sampled_from([1e-8, 1e-3]), st.booleans()).map(
        lambda a: lambda: optim.scale_by_adam(a[0], a[1], a[2])),
    "lion": BETAS.map(lambda b: lambda: optim.lion(b)),
    "l2": DECAY.map(lambda d: lambda: optim.l2(d)),
    "scale_by_lr": st.just(optim.scale_by_lr),
}


@st.composite
def chains(draw: st.DrawFn) -> Callable[[], list[Rule]]:
    names = draw(st.lists(st.sampled_from(sorted(TRANSFORMS)), min_size=0, max_size=4))
    names = [n for i, n in enumerate(names) if n != "scale_by_lr" or "scale_by_lr" not in names[:i]]
    makers = [draw(TRANSFORMS[n]) for n in names]
    if draw(st.booleans()):
        makers.insert(0, draw(st.sampled_from([0.1, 1.0, 100.0]).map(lambda m: lambda: optim.clip_by_global_norm(m))))
    if draw(st.booleans()):
        makers.append(draw(st.tuples(DECAY, st.booleans()).map(
            lambda a: lambda: optim.decoupled_decay(a[0], lr_scaled=a[1]))))
    projection = draw(st.sampled_from([None, "box", "ball"]))
    if projection is not None:
        radius = draw(st.sampled_from([0.5, 2.0]))
        makers.append(lambda: optim.project_box(radius) if projection == "box" else optim.project_ball(radius))
    return lambda: [make() for make in makers]


@st.composite
def optimizers(draw: st.DrawFn) -> tuple[str, Callable[..., torch.optim.Optimizer], torch.dtype | None, str]:
    """A description, a factory ``(params, engine=...) -> optimizer``, its state dtype and param rounding."""
    lr = draw(st.sampled_from([1e-3, 0.1, 1.0]))
    maximize = draw(st.booleans())
    state_dtype = draw(st.sampled_from([None, None, torch.bfloat16, torch.float32, "int8"]))
    rounding = draw(st.sampled_from(["stochastic", "stochastic", "nearest"]))
    common: dict[str, Any] = {"lr": lr, "maximize": maximize, "state_dtype": state_dtype, "param_rounding": rounding}
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(optim.OPTIMIZERS)))
        kw: dict[str, Any] = {"weight_decay": draw(DECAY)}
        if draw(st.booleans()):
            kw["max_grad_norm"] = draw(st.sampled_from([0.1, 10.0]))
        if draw(st.booleans()):
            kw["constraint"], kw["radius"] = draw(st.sampled_from(["box", "ball"])), 2.0
        if name == "sgd":
            kw["momentum"] = draw(st.sampled_from([0.0, 0.9]))
            kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
        if name in ("adam", "adamw"):
            kw["amsgrad"] = draw(st.booleans())
        kw.update(common)
        cls = optim.OPTIMIZERS[name]
        return f"{name}({kw})", lambda params, **k: cls(params, **kw, **k), state_dtype, rounding
    make = draw(chains())
    return (f"chain({[r.name for r in make()]}, {common})",
            lambda params, **k: optim.chain(params, *make(), **common, **k), state_dtype, rounding)


# -- parameters -----------------------------------------------------------------------------------------------
#: Around the native loop's vector width and 16-element thread split, and its thread threshold.
SIZES = [1, 2, 15, 16, 17, 33, 255, PARALLEL_MIN // 2 - 1, PARALLEL_MIN // 2 + 17,
         PARALLEL_MIN + 1]


@dataclass
class ParamSpec:
    kind: str  # "0d", "empty", "vector", "transposed", "channels_last", "view"
    shape: tuple[int, ...]
    group: int
    start: int = 0  # for views: where it starts in the shared buffer


@dataclass
class Scenario:
    description: str
    factory: Callable[..., torch.optim.Optimizer]
    state_dtype: torch.dtype | str | None
    dtype: torch.dtype
    specs: list[ParamSpec]
    buffer: int  # size of the shared buffer the views live in
    group_lr: list[float]
    steps: int
    seed: int
    missing: set[tuple[int, int]]  # (step, param) without gradient
    specials: list[tuple[int, int, int, float]]  # (step, param, flat index, value)
    grad_contiguous: bool
    changes: dict[int, list[tuple[int, int]]]  # step -> (group, which key and value)
    round_trip: tuple[int, str] | None  # (after step, into engine)
    grad_scale: float | None
    threads: int
    flat: bool
    param_rounding: str = "stochastic"


@st.composite
def scenarios(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Scenario:
    """A scenario; ``dtype``: its parameters' dtype (drawn if None)."""
    description, factory, state_dtype, rounding = draw(optimizers())
    if dtype is None:
        dtype = draw(st.sampled_from([torch.float32] * 6 + [torch.float64, torch.bfloat16, torch.bfloat16,
                                                            torch.float16]))
    groups = draw(st.integers(1, 3))
    specs: list[ParamSpec] = []
    buffer = 0
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["0d", "empty", "vector", "vector", "transposed", "channels_last", "view"]))
        group = draw(st.integers(0, groups - 1))
        if kind == "0d":
            specs.append(ParamSpec(kind, (), group))
        elif kind == "empty":
            specs.append(ParamSpec(kind, draw(st.sampled_from([(0,), (3, 0)])), group))
        elif kind == "vector":
            specs.append(ParamSpec(kind, (draw(st.sampled_from(SIZES)),), group))
        elif kind == "transposed":
            specs.append(ParamSpec(kind, (draw(st.sampled_from([3, 17, 200])), draw(st.sampled_from([2, 5]))), group))
        elif kind == "channels_last":
            specs.append(ParamSpec(kind, (2, draw(st.sampled_from([3, 16])), 3, 3), group))
        else:
            n = draw(st.sampled_from(SIZES))
            overlap = draw(st.booleans()) and buffer > 0
            start = draw(st.integers(0, buffer - 1)) if overlap else buffer
            specs.append(ParamSpec(kind, (n,), group, start))
            buffer = max(buffer, start + n)
    steps = draw(st.integers(2, 5))
    np_ = len(specs)
    missing = set(draw(st.lists(st.tuples(st.integers(0, steps - 1), st.integers(0, np_ - 1)), max_size=3)))
    specials = draw(st.lists(st.tuples(st.integers(0, steps - 1), st.integers(0, np_ - 1), st.integers(0, 10**6),
                                       st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                                                        1e30, 1e-30])), max_size=4))
    changes: dict[int, list[tuple[int, int]]] = {}
    for _ in range(draw(st.integers(0, 3))):
        t = draw(st.integers(1, steps - 1))
        changes.setdefault(t, []).append((draw(st.integers(0, groups - 1)), draw(st.integers(0, 2**30))))
    round_trip = None
    if draw(st.booleans()):
        round_trip = (draw(st.integers(0, steps - 2)), draw(st.sampled_from(list(ENGINES))))
    return Scenario(
        description=description, factory=factory, state_dtype=state_dtype, dtype=dtype, specs=specs, buffer=buffer,
        group_lr=[draw(st.sampled_from([1e-3, 0.1, 1.0])) for _ in range(groups)], steps=steps,
        seed=draw(st.integers(0, 2**31 - 1)), missing=missing, specials=specials,
        grad_contiguous=draw(st.booleans()), changes=changes,
        round_trip=round_trip, grad_scale=draw(st.sampled_from([None, None, 1.0, 1024.0])),
        threads=draw(st.sampled_from([1, 2, 3])), flat=draw(st.sampled_from([False, False, False, True])),
        param_rounding=rounding)


def build_params(s: Scenario) -> list[list[nn.Parameter]]:
    """The scenario's parameters (values from its seed), sorted into its groups."""
    gen = torch.Generator().manual_seed(s.seed)
    shared = torch.randn(s.buffer, generator=gen).to(s.dtype)
    groups: list[list[nn.Parameter]] = [[] for _ in s.group_lr]
    for spec in s.specs:
        if spec.kind == "view":
            p = nn.Parameter(shared[spec.start:spec.start + spec.shape[0]])
        elif spec.kind == "transposed":
            p = nn.Parameter(torch.randn(spec.shape[::-1], generator=gen).to(s.dtype).t())
        elif spec.kind == "channels_last":
            p = nn.Parameter(torch.randn(spec.shape, generator=gen).to(s.dtype)
                             .contiguous(memory_format=torch.channels_last))
        else:
            p = nn.Parameter(torch.randn(spec.shape, generator=gen).to(s.dtype))
        groups[spec.group].append(p)
    return groups


def gradients(s: Scenario, params: list[nn.Parameter], step: int) -> list[torch.Tensor | None]:
    """This step's gradients: normal values at a scale of 1e-3 to 1e2, the scenario's special values, None
    where it has none; contiguous, or with the parameter's strides (as autograd lays them out)."""
    gen = torch.Generator().manual_seed(s.seed + 7919 * (step + 1))
    out: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * 10.0 ** float(torch.randint(-3, 3, (), generator=gen))
        g = g.to(s.dtype)
        for t, j, index, value in s.specials:
            if t == step and j == i and g.numel():
                g.view(-1)[index % g.numel()] = value
        if not s.grad_contiguous:
            g = torch.empty_like(p).copy_(g)
        out.append(None if (step, i) in s.missing else g)
    return out


def change_value(key: str, old: Any, pick: int) -> Any:
    """A new value for hyperparameter ``key`` (was ``old``), as a scheduler sets one: a number or a 0-d tensor."""
    options = {"lr": [0.0, 1e-3, 0.05, 1.0], "weight_decay": [0.0, 0.01, 0.3], "momentum": [0.0, 0.5, 0.95],
               "beta": [0.0, 0.5, 0.95], "eps": [1e-8, 1e-2], "max_grad_norm": [0.5, 10.0], "radius": [0.5, 3.0],
               "dampening": [0.0, 0.2]}
    base = key.rsplit(".", 1)[-1].rstrip("0123456789")
    if base == "betas":
        b1 = [0.0, 0.5, 0.9][pick % 3]
        b2 = [0.9, 0.999][(pick // 3) % 2]
        return (torch.tensor(b1), torch.tensor(b2)) if (pick // 6) % 2 else (b1, b2)
    values = options.get(base)
    if values is None:
        return old
    value = values[pick % len(values)]
    # a number or a float32 0-d tensor (float64 ones: test_native_float64_tensor_weight_decay)
    return value if (pick // len(values)) % 2 == 0 else torch.tensor(value, dtype=torch.float32)


def apply_changes(s: Scenario, opt: torch.optim.Optimizer, step: int) -> None:
    for gi, pick in s.changes.get(step, []):
        group = opt.param_groups[gi % len(opt.param_groups)]
        keys = sorted(k for k in group if k not in ("params", "maximize", "nesterov", "amsgrad")
                      and not isinstance(group[k], bool))
        if keys:
            key = keys[pick % len(keys)]
            if key == "momentum" and group.get("nesterov"):
                continue  # nesterov needs momentum > 0
            group[key] = change_value(key, group[key], pick // len(keys))


# -- the comparison -------------------------------------------------------------------------------------------
def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of each element of ``x`` (float64) in ``dtype``."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.abs())
    return torch.clamp(info.eps * torch.exp2((exponent - 1).double()), min=info.smallest_normal * info.eps)


def assert_same(out: torch.Tensor, ref: torch.Tensor, what: str, ulps: int, scale: torch.Tensor | None = None) -> None:
    """``out`` is ``ref``: NaN where it has NaN; elsewhere the same value and sign of zero, or (``ulps``)
    within that many units in the last place of the dtype (of ``|ref|``, or of ``scale`` where larger)
    where both are finite."""
    assert (out.shape, out.dtype) == (ref.shape, ref.dtype), f"{what}: {out.shape} {out.dtype}, not {ref.dtype}"
    a, b = out.detach().double(), ref.detach().double()
    nan = torch.isnan(b)
    assert torch.equal(torch.isnan(a), nan), f"{what}: NaN where the reference has none, or the reverse"
    a, b = a[~nan], b[~nan]
    same = (a == b) & (torch.signbit(a) == torch.signbit(b))
    if ulps:
        finite = torch.isfinite(a) & torch.isfinite(b)
        size = b.abs() if scale is None else torch.maximum(b.abs(), scale.double()[~nan])
        same |= finite & ((a - b).abs() <= ulps * _ulp(size, out.dtype))
    assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ, e.g. {a[~same][:3]} for {b[~same][:3]}"


def compare(opt: torch.optim.Optimizer, ref: torch.optim.Optimizer, ulps: int, engine: str, step: int,
            before: list[torch.Tensor]) -> None:
    """``opt`` is ``ref`` after a step from the parameters ``before``. With ``ulps`` (Adam) a parameter may differ
    by 2 ulps of its step ``u`` or of itself, whichever is larger: ``u`` within 1 ulp, and ``w + u`` rounded once."""
    params = [p for g in opt.param_groups for p in g["params"]]
    ref_params = [p for g in ref.param_groups for p in g["params"]]
    for i, (p, q) in enumerate(zip(params, ref_params)):
        step_size = (q.detach().double() - before[i].double()).abs()
        assert_same(p, q, f"{engine}, step {step}, parameter {i}", 2 * ulps, torch.nan_to_num(step_size, nan=0.0))
        state, ref_state = opt.state.get(p, {}), ref.state.get(q, {})
        assert sorted(state) == sorted(ref_state), f"{engine}, step {step}, parameter {i}: state keys differ"
        for key, value in ref_state.items():  # 8-bit codes exactly: the state Adam's ulp reaches is not stored
            assert_same(state[key], value, f"{engine}, step {step}, parameter {i}, state {key!r}",
                         ulps if value.is_floating_point() else 0)


def align(opt: torch.optim.Optimizer, ref: torch.optim.Optimizer) -> None:
    """Set ``opt``'s parameters and state to the reference's values, in place (after an Adam step)."""
    with torch.no_grad():
        params = [p for g in opt.param_groups for p in g["params"]]
        ref_params = [p for g in ref.param_groups for p in g["params"]]
        for p, q in zip(params, ref_params):
            p.copy_(q)
            for key, value in ref.state.get(q, {}).items():
                if key != "step":
                    opt.state[p][key].copy_(value)


def eager(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
    return gm.forward


@pytest.fixture(autouse=True, scope="module")
def eager_compiles() -> Any:
    """The compiled engine traces its step and runs the traced graph eagerly (inductor's code: test_engines)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled, "BACKEND", eager)
        yield


def make(s: Scenario, engine: str, groups: list[list[nn.Parameter]]) -> torch.optim.Optimizer:
    spec = [{"params": ps, "lr": lr} for ps, lr in zip(groups, s.group_lr) if ps]
    opt = s.factory(spec, engine=engine, flat=s.flat)
    return opt


def outcome(fn: Callable[[], Any]) -> tuple[str, str] | None:
    """None if ``fn()`` returned; else the exception's type and message."""
    try:
        fn()
    except Exception as err:  # the engines must raise what the reference raises
        return type(err).__name__, str(err)
    return None


def half_precision_arithmetic(s: Scenario) -> bool:
    """Whether the scenario steps in half-precision arithmetic (float16; bfloat16 unless its chain runs in
    float32, which stochastic rounding does)."""
    if s.dtype == torch.float16:
        return True
    return s.dtype == torch.bfloat16 and s.param_rounding == "nearest"


def check(s: Scenario, engines: list[str]) -> None:
    if half_precision_arithmetic(s):  # test_compiled_half_precision_adam
        engines = [e for e in engines if e != "compiled"]
        if s.round_trip is not None and s.round_trip[1] == "compiled":
            s.round_trip = (s.round_trip[0], "foreach")
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        run_all(s, engines)
    finally:
        torch.set_num_threads(threads)


def run_all(s: Scenario, engines: list[str]) -> None:
    ref_groups = build_params(s)
    try:
        ref = make(s, "reference", ref_groups)
    except ValueError as err:  # an invalid combination (e.g. nesterov without momentum): every engine refuses
        for engine in engines:
            with pytest.raises(ValueError, match=None) as info:
                make(s, engine, build_params(s))
            assert str(info.value) == str(err)
        assume(False)
    adam = any(isinstance(r, ScaleByAdam) for r in ref.rules)
    ulps = 1 if adam else 0
    if s.state_dtype == "int8" and adam_feeds_state(ref.rules):
        # the native loop's Adam output, within 1 ulp, is a later rule's input: its 8-bit state may then
        # round to the neighbouring code, which no bound in ulps covers (Adam's own state is exact)
        engines = [e for e in engines if e not in ("native", "auto")]
    runs = {engine: make(s, engine, build_params(s)) for engine in engines}
    scale = None if s.grad_scale is None else torch.tensor(s.grad_scale)
    for step in range(s.steps):
        ref_params = [p for g in ref.param_groups for p in g["params"]]
        grads = gradients(s, ref_params, step)
        apply_changes(s, ref, step)
        for p, g in zip(ref_params, grads):
            p.grad = None if g is None else g.clone()
        before = [p.detach().clone() for p in ref_params]
        expected = outcome(lambda: ref.step(grad_scale=scale))
        for engine in engines:
            opt = runs[engine]
            apply_changes(s, opt, step)
            for p, g in zip([p for group in opt.param_groups for p in group["params"]], grads):
                p.grad = None if g is None else g.clone()
            got = outcome(lambda opt=opt: opt.step(grad_scale=scale))
            assert got == expected, f"{engine} at step {step}: {got} where the reference engine gives {expected}"
            if expected is None:
                compare(opt, ref, ulps, engine, step, before)
                if adam:
                    align(opt, ref)
            if s.round_trip is not None and s.round_trip[0] == step:
                into = s.round_trip[1]
                again = make(s, into, [list(g["params"]) for g in opt.param_groups])
                again.load_state_dict(copy.deepcopy(opt.state_dict()))
                runs[engine] = again
        if expected is not None:
            return


def adam_feeds_state(rules: list[Rule]) -> bool:
    """Whether a rule that keeps state follows an Adam rule in the chain (it takes Adam's output as its input)."""
    first = next((i for i, r in enumerate(rules) if isinstance(r, ScaleByAdam)), len(rules))
    return any(r.all_state_keys() for r in rules[first + 1:])


#: A compiled-engine test fails where the engine falls back to foreach (its RuntimeWarning) instead of compiling.
NO_COMPILED_FALLBACK = pytest.mark.filterwarnings("error:descend. engine='compiled' could not compile:RuntimeWarning")

SETTINGS = {"deadline": None, "derandomize": True, "print_blob": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "descend-cache"))


@settings(max_examples=30, **SETTINGS)
@given(scenarios())
def test_every_engine_equals_the_reference(s: Scenario) -> None:
    """The engines without a compile step (the compiled engine traces each new layout: seconds each)."""
    check(s, ["foreach", "native", "auto"])


@NO_COMPILED_FALLBACK
@settings(max_examples=8, **SETTINGS)
@given(scenarios())
def test_the_compiled_engine_equals_the_reference(s: Scenario) -> None:
    check(s, ["compiled"])


@NO_COMPILED_FALLBACK
@settings(max_examples=30, **SETTINGS)
@given(scenarios(dtype=torch.bfloat16))
def test_every_engine_equals_the_reference_on_bfloat16_parameters(s: Scenario) -> None:
    """bfloat16 parameters, mostly rounded stochastically: every engine draws the reference's noise."""
    check(s, ["foreach", "native", "auto", "compiled"])


@pytest.mark.slow
@NO_COMPILED_FALLBACK
@settings(max_examples=300, **SETTINGS)
@given(scenarios())
def test_every_engine_equals_the_reference_on_many_examples(s: Scenario) -> None:
    check(s, ["foreach", "native", "auto", "compiled"])


# -- what the property found, kept as explicit cases (the engine-level ones are in test_engine_correctness.py) ------
def test_compiled_0d_float64_parameters_with_bf16_state() -> None:
    """A 0-d parameter times a 0-d float64 hyperparameter was promoted to float64 in the compiled step."""
    def run(engine: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn((), generator=gen, dtype=torch.float64)) for _ in range(3)]
        opt = optim.SGD(ps, lr=1e-3, momentum=0.9, state_dtype=torch.bfloat16, engine=engine)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn((), generator=gen, dtype=torch.float64)
            opt.step()
        return torch.stack([p.detach() for p in ps])

    assert torch.equal(run("compiled"), run("reference"))


def test_compiled_adam_with_clipping_on_a_0d_parameter() -> None:
    """The same promotion: the clipped gradient of a 0-d parameter in float64, its exp_avg off in the last bit."""
    def run(engine: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(266)
        p = nn.Parameter(torch.randn((), generator=gen))
        opt = optim.Adam([p], lr=1e-3, max_grad_norm=0.1, engine=engine)
        for step in range(2):
            g = torch.Generator().manual_seed(266 + 7919 * (step + 1))
            p.grad = torch.randn((), generator=g) * 10.0 ** float(torch.randint(-3, 3, (), generator=g))
            opt.step()
        return opt.state[p]["exp_avg"]

    assert torch.equal(run("compiled"), run("reference"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_foreach_half_precision_momentum_multiplies_as_tensor_mul(dtype: torch.dtype) -> None:
    """torch's in-place ``_foreach_mul_`` by a Python number rounds the number to half precision first."""
    def run(engine: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(37, generator=gen).to(dtype)) for _ in range(3)]
        opt = optim.SGD(ps, lr=0.01, momentum=0.9, engine=engine)
        for _ in range(10):
            for p in ps:
                p.grad = torch.randn(37, generator=gen).to(dtype)
            opt.step()
        return torch.cat([p.detach() for p in ps])

    assert torch.equal(run("foreach"), run("reference"))


def test_compiled_half_precision_adam() -> None:
    def run(engine: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn(15, generator=gen).to(torch.bfloat16))
        opt = optim.Adam([p], lr=1e-3, engine=engine)
        for _ in range(3):
            p.grad = torch.randn(15, generator=gen).to(torch.bfloat16) * 30
            opt.step()
        return opt.state[p]["exp_avg_sq"]

    assert torch.equal(run("compiled"), run("reference"))


def test_a_0d_parameter_steps_as_a_1_element_tensor() -> None:
    """An fp16 0-d parameter unscaled by a float32 grad scale: two 0-d operands compute in float32 where a
    1-element tensor (a flat buffer's slice, a bucket's view) stays fp16; every engine now does the latter."""
    s = Scenario(description="adam", factory=lambda params, **k: optim.Adam(params, lr=1e-3, **k),
                 state_dtype=torch.bfloat16, dtype=torch.float16, specs=[ParamSpec("0d", (), 0)], buffer=0,
                 group_lr=[1e-3], steps=2, seed=904353, missing=set(), specials=[], grad_contiguous=False,
                 changes={1: [(0, 0)]}, round_trip=None, grad_scale=1024.0, threads=1, flat=True)
    check(s, ["foreach", "native", "auto", "compiled"])


def test_native_adam_bound_is_on_the_step_where_w_plus_u_cancels() -> None:
    """lr=0.1 steps of the size of the weights: ``w + u`` cancels, and one ulp of ``u`` is many of the result."""
    s = Scenario(description="adam", factory=lambda params, **k: optim.Adam(params, lr=1e-3, **k), state_dtype=None,
                 dtype=torch.float32, specs=[ParamSpec("vector", (16383,), 0)], buffer=0, group_lr=[0.1], steps=2,
                 seed=0, missing=set(), specials=[], grad_contiguous=False, changes={}, round_trip=None,
                 grad_scale=None, threads=1, flat=False)
    check(s, ["native", "foreach", "auto"])


def test_native_float64_tensor_weight_decay() -> None:
    def run(engine: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn((), generator=gen))
        opt = optim.chain([p], optim.decoupled_decay(0.0), lr=1e-3, engine=engine)
        for step in range(4):
            if step == 1:
                opt.param_groups[0]["weight_decay"] = torch.tensor(0.01, dtype=torch.float64)
            p.grad = torch.randn((), generator=gen)
            opt.step()
        return p.detach()

    assert torch.equal(run("native"), run("reference"))


# -- 8-bit state in the native loop ------------------------------------------------------------------------------
#: Whole blocks, a short last block, one element, and one tensor large enough that two threads split the bucket.
INT8_SIZES = [1, 255, 256, 257, 1000, PARALLEL_MIN + 300]
INT8_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, **k: optim.AdamW(params, lr=1e-2, weight_decay=0.1, state_dtype="int8", **k),
    "adam_amsgrad": lambda params, **k: optim.Adam(params, lr=1e-2, amsgrad=True, state_dtype="int8", **k),
    "lion": lambda params, **k: optim.Lion(params, lr=1e-3, state_dtype="int8", **k),
    "signum": lambda params, **k: optim.Signum(params, lr=1e-3, state_dtype="int8", **k),
    "momentum": lambda params, **k: optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, state_dtype="int8", **k),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(INT8_OPTIMIZERS))
def test_native_int8_state_is_the_reference_bit_for_bit(name: str, dtype: torch.dtype, threads: int) -> None:
    """Several tensors in one bucket, sizes that are and are not multiples of the block, a NaN and an infinity in
    a gradient (their blocks' scales turn non-finite): the native loop's codes and scales are the reference's."""
    s = Scenario(description=name, factory=INT8_OPTIMIZERS[name], state_dtype="int8", dtype=dtype,
                 specs=[ParamSpec("vector", (n,), 0) for n in INT8_SIZES], buffer=0, group_lr=[1e-2], steps=4,
                 seed=8, missing=set(), specials=[(2, 4, 3, float("nan")), (1, 3, 700, float("inf"))],
                 grad_contiguous=True, changes={}, round_trip=None, grad_scale=None, threads=threads, flat=False,
                 param_rounding="stochastic")
    check(s, ["native"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_engine_steps_int8_state_itself(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in (300, 512)]
    opt = optim.AdamW(params, lr=1e-3, state_dtype="int8", engine="native")
    kernels = []
    for _ in range(3):  # the first step creates the state (on the reference engine, as for any state)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
        kernels.append([(run.kernel, run.tensors) for run in opt.last_step_kernels])
    assert kernels[1:] == [[("native", 2)]] * 2
