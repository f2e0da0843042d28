"""The native engine: the rules traced into one C loop, checked against the reference engine."""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from typing import Any

import pytest
import torch

from descend import optim
from descend.optim.engines import KernelRun
from descend.optim.rules.base import Rule
from test_engines import PRESETS, assert_close, kernels, run

pytestmark = pytest.mark.skipif(not any(map(shutil.which, ("cc", "gcc", "clang"))), reason="needs a C compiler")

#: Chains whose every operation rounds as torch's does: the native loop equals the reference bit for bit.
EXACT = ["sgd_plain", "sgd_nesterov_l2", "momentum", "signsgd", "signum_box", "lion_maximize", "user_chain"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "descend-cache"))


def _native_run(factory: Any) -> torch.optim.Optimizer:
    """Three steps of two parameters on ``engine="native"``."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 4), (5,)]]
    opt = factory(params, engine="native")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_native_matches_reference(name: str) -> None:
    """Every preset (clipping, projections, L2, AMSGrad, maximize, two groups, a missing gradient) runs natively."""
    assert_close(run(PRESETS[name], "native"), run(PRESETS[name], "reference"))
    assert kernels(_native_run(PRESETS[name])) == ["native"], "ran on foreach, not natively"


@pytest.mark.parametrize("name", EXACT)
def test_native_is_bit_exact_where_the_operations_are_torchs(name: str) -> None:
    assert_close(run(PRESETS[name], "native"), run(PRESETS[name], "reference"), rtol=0.0)


def test_a_schedule_changes_scalars_not_the_kernel(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hyperparameters are inputs of the loop, not constants in its code: one kernel in the cache."""
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path))
    params = [torch.nn.Parameter(torch.randn(8))]
    opt = optim.Lion(params, engine="native")
    for lr in (1e-3, 5e-4, 1e-4):
        opt.param_groups[0]["lr"] = lr
        params[0].grad = torch.ones(8)
        before = params[0].detach().clone()
        opt.step()
    assert kernels(opt) == ["native"] and len(list((tmp_path / "kernels").glob("*.so"))) == 1
    torch.testing.assert_close(params[0].detach(), before - 1e-4)  # sign(+1) = 1, a step of the last lr


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("name", ["Lion", "Signum", "SGD"])
def test_bf16_state_is_rounded_with_the_reference_engines_noise(name: str, flat: bool) -> None:
    """bfloat16 state: the loop widens it, runs the rules in float32 and rounds stochastically with the
    noise every engine draws for the element; parameters and state equal the reference's bit for bit."""
    results = []
    for engine in ("native", "reference"):
        gen = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(40, 7), (1000,), (3,)]]
        kw: dict[str, Any] = {"lr": 0.01, "momentum": 0.9} if name == "SGD" else {"weight_decay": 0.1}
        opt = getattr(optim, name)(params, engine=engine, state_dtype=torch.bfloat16, flat=flat, **kw)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        if engine == "native":
            assert "native" in kernels(opt)
        states = [t for p in params for k, t in sorted(opt.state[p].items()) if k != "step"]
        assert all(t.dtype == torch.bfloat16 for t in states)
        results.append([p.detach().clone() for p in params] + states)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("case", ["float64", "grad_scale"])
def test_unsupported_buckets_run_on_foreach(case: str) -> None:
    """float64 parameters and a GradScaler's scale are not run natively, and give the reference's answer."""
    dtype = torch.float64 if case == "float64" else torch.float32
    scale = 4.0 if case == "grad_scale" else None
    outs, ran = [], []
    for engine in ("native", "reference"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=dtype))]
        opt = optim.Lion(params, lr=0.01, weight_decay=0.1, engine=engine)
        for _ in range(4):
            grad = torch.randn(5, 3, generator=gen, dtype=dtype)
            params[0].grad = grad * scale if scale else grad
            opt.step(grad_scale=torch.tensor(scale) if scale else None)
        outs.append([params[0].detach()])
        ran.append(kernels(opt))
    assert_close(outs[0], outs[1], rtol=1e-12 if dtype == torch.float64 else 1e-6)
    assert ran[0] == ["foreach"]


class Halve(Rule):
    """A user rule that branches on a hyperparameter as a Python number: not expressible as one C loop."""

    name = "halve"

    def __init__(self, on: float = 1.0) -> None:
        super().__init__(on=on)

    def update(self, u: Any, w: Any, state: Any, hp: Any, step: Any) -> Any:
        return u * 0.5 if float(hp["on"]) > 0 else u

    def equation(self) -> str:
        return "u ← u/2"


def test_an_untraceable_rule_runs_on_foreach_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    params = [torch.nn.Parameter(torch.ones(4))]
    opt = optim.chain(params, Halve(), lr=0.1, engine="native")
    with caplog.at_level(logging.INFO, logger="descend.optim"):
        for _ in range(2):
            params[0].grad = torch.full((4,), 2.0)
            opt.step()
    assert any("Python number" in r.getMessage() for r in caplog.records)
    assert kernels(opt) == ["foreach"]
    torch.testing.assert_close(params[0].detach(), torch.full((4,), 1 - 2 * 0.1 * 1.0))


def test_without_a_compiler_native_warns_and_auto_is_silent(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path / "empty-cache"))
    ref = run(PRESETS["lion_maximize"], "reference")
    with pytest.warns(RuntimeWarning, match="could not compile"):
        out = run(PRESETS["lion_maximize"], "native")
    assert_close(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(run(PRESETS["lion_maximize"], "auto"), ref)


def test_kernels_are_compiled_once_per_machine(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path))
    _native_run(lambda p, **k: optim.Signum(p, **k))
    built = sorted((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    _native_run(lambda p, **k: optim.Signum(p, **k))  # a new optimizer, as in a new process: loads the file
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("*.so")] == [stamp]


def test_auto_runs_sign_methods_natively_on_the_cpu() -> None:
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen))]
    opt = optim.Lion(params, weight_decay=0.1)
    for _ in range(3):
        params[0].grad = torch.randn(4, 3, generator=gen)
        opt.step()
    assert kernels(opt) == ["native"]


def test_a_cache_others_can_write_to_is_not_used(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library from a directory another user could write to would run as this user: it is never loaded."""
    shared = tmp_path / "shared"
    (shared / "kernels").mkdir(parents=True)
    (shared / "kernels").chmod(0o777)
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "private-tmp"))
    _native_run(lambda p, **k: optim.Signum(p, **k))
    assert not list((shared / "kernels").glob("*.so"))
    built = list((tmp_path / "private-tmp").glob("descend-kernels-*/*.so"))
    assert len(built) == 1 and not built[0].parent.stat().st_mode & 0o077


def test_a_non_contiguous_parameter_steps_on_foreach_and_the_rest_natively() -> None:
    """A transposed (non-contiguous) parameter cannot be walked as one row of memory: it steps on foreach,
    its contiguous neighbours in the loop, and the result is the reference's."""
    outs = []
    for engine in ("native", "reference"):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen).t()),
                  torch.nn.Parameter(torch.randn(4, generator=gen))]
        assert not params[0].is_contiguous()
        opt = optim.Lion(params, lr=0.01, weight_decay=0.1, engine=engine)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        outs.append([p.detach().clone() for p in params])
        if engine == "native":
            assert kernels(opt) == ["foreach", "native"]  # one tensor each
    assert_close(outs[0], outs[1])
    assert torch.equal(outs[0][1], outs[1][1])  # the contiguous one, natively: bit for bit


# -- a remembered group: what the next step must notice -----------------------------------------------


def _swap_storage(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    params[0].data = params[0].data.clone()  # same values at a new address: the step must follow it


def _replace_momentum(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    opt.state[params[1]]["momentum_buffer"] = torch.randn(params[1].shape, generator=gen)


def _replace_state_dict(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    opt.state[params[1]] = {"step": opt.state[params[1]]["step"].clone(),
                            "momentum_buffer": torch.randn(params[1].shape, generator=gen)}


def _forget_state(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    del opt.state[params[2]]


def _no_gradient(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    params[0].grad = None


def _transposed_gradient(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    rows, cols = params[1].shape
    params[1].grad = torch.randn(cols, rows, generator=gen).t()  # right shape, not contiguous


def _swap_params(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    group = opt.param_groups[0]["params"]
    group[0], group[2] = group[2], group[0]


def _schedule_and_decay(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    opt.param_groups[0]["lr"] = 0.05
    opt.param_groups[0]["weight_decay"] = 0.1  # a rule turns on: another kernel


def _momentum_off(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    opt.param_groups[0]["momentum"] = 0.0  # the momentum rule turns off: no state tensor in the loop


def _tensor_lr(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    lr = opt.param_groups[0]["lr"]
    if torch.is_tensor(lr):
        lr.fill_(0.02)  # changed in place: the same object with another value
    else:
        opt.param_groups[0]["lr"] = torch.tensor(0.05)


def _reload(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    state = opt.state_dict()
    state["state"][0]["momentum_buffer"] = torch.randn(params[0].shape, generator=gen)
    opt.load_state_dict(state)


CHANGES = [_swap_storage, _replace_momentum, _replace_state_dict, _forget_state, _no_gradient, _transposed_gradient,
           _swap_params, _schedule_and_decay, _momentum_off, _tensor_lr, _reload]


@pytest.mark.parametrize("engine", ["auto", "native"])
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_a_remembered_group_notices_what_changed(change: Any, engine: str) -> None:
    """Once a group has stepped natively in one loop, later steps reuse what that step found; any change
    to parameters, gradients, state or hyperparameters between steps must reach the next step, exactly
    as the reference engine sees it. Each change is made before steps 4 and 5."""
    def trajectory(engine_name: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(6,), (4, 5), (3,)]]
        opt = optim.SGD(params, lr=0.1, momentum=0.9, engine=engine_name)
        seen = []
        for i in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if i == 3 and engine_name != "reference":  # one loop stepped the whole group: the next steps reuse it
                assert opt.last_step_kernels == (KernelRun(0, "native", 3),), "the fast path went untested"
            if i in (3, 4):
                change(opt, params, gen)
            opt.step()
            seen += [p.detach().clone() for p in params]
            seen += [s["momentum_buffer"].clone() for s in opt.state.values() if "momentum_buffer" in s]
        return seen

    assert_close(trajectory(engine), trajectory("reference"), rtol=0.0)


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_remembered_steps_count_in_torchs_step_dtype(default: torch.dtype) -> None:
    """The loop's call advances the step counters in the dtype torch.optim keeps them in (float64 under a
    float64 default dtype), which Adam's bias corrections read."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        def run(engine: str) -> tuple[list[float], list[torch.Tensor]]:
            gen = torch.Generator().manual_seed(3)
            params = [torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float32)) for _ in range(2)]
            opt = optim.Adam(params, lr=0.1, engine=engine)
            for _ in range(5):
                for p in params:
                    p.grad = torch.randn(4, generator=gen, dtype=torch.float32)
                opt.step()
            assert all(opt.state[p]["step"].dtype == default for p in params)
            return [float(opt.state[p]["step"]) for p in params], [p.detach() for p in params]

        steps, params = run("native")
        assert steps == [5.0, 5.0]
        assert_close(params, run("reference")[1])
    finally:
        torch.set_default_dtype(previous)


def test_a_remembered_group_reads_per_step_scalars_every_step() -> None:
    """Adam's bias corrections change every step, and a schedule changes the learning rate."""
    def trajectory(engine_name: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(7, generator=gen)) for _ in range(3)]
        opt = optim.Adam(params, lr=0.1, engine=engine_name)
        seen = []
        for i in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.param_groups[0]["lr"] = 0.1 / (1 + (i // 3))
            opt.step()
            seen += [p.detach().clone() for p in params]
        if engine_name == "native":
            assert opt.last_step_kernels == (KernelRun(0, "native", 3),)
        return seen

    assert_close(trajectory("native"), trajectory("reference"))


def test_a_group_with_frozen_parameters_is_remembered_until_they_thaw() -> None:
    """Parameters without a gradient (frozen) stay out of the loop; one that gets a gradient steps again."""
    def trajectory(engine_name: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(4)]
        opt = optim.SGD(params, lr=0.1, momentum=0.9, engine=engine_name)
        seen = []
        for i in range(7):
            for k, p in enumerate(params):
                frozen = (k == 2 and i < 4) or (k == 0 and i == 5)
                p.grad = None if frozen else torch.randn(5, generator=gen)
            if i == 3 and engine_name != "reference":  # the loop stepped all but the frozen one
                assert opt.last_step_kernels == (KernelRun(0, "native", 3),)
            opt.step()
            seen += [p.detach().clone() for p in params]
        return seen

    assert_close(trajectory("native"), trajectory("reference"), rtol=0.0)
