"""Odd but legal inputs on the default path: every engine computes what the reference engine computes,
or raises what it raises (mismatched state, half precision, NaN, 0-d, counters, shared memory, the cache)."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from descend import optim
from descend.optim._chain import ENGINES
from descend.optim.engines.native import compiler as native

ALL_ENGINES = [*ENGINES, "fused"]
#: The system C compiler the native engine finds without $CC, or None.
CC = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
needs_cc = pytest.mark.skipif(CC is None, reason="needs a C compiler")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "descend-cache"))


@pytest.fixture
def two_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so -0.0 and +0.0 differ, and NaN equals itself)."""
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def steps(factory: Callable[..., torch.optim.Optimizer], engine: str, params: list[torch.Tensor],
          grads: list[list[torch.Tensor | None]]) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """Copies of ``params`` stepped with ``grads[t][i]`` under ``engine``; the results and the optimizer."""
    ps = [nn.Parameter(p.detach().clone()) for p in params]
    opt = factory(ps, engine=engine)
    for per_step in grads:
        for p, g in zip(ps, per_step):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


# -- 1. state that does not fit its parameter ----------------------------------------------------------------
@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_a_state_dict_of_other_shapes_is_refused_on_load_and_keeps_the_state(engine: str) -> None:
    """A checkpoint of a resized layer: the native loop would walk 64 elements of a 4-element state."""
    a = nn.Parameter(torch.randn(4))
    a.grad = torch.randn(4)
    small = optim.AdamW([a], engine=engine)
    small.step()
    b = nn.Parameter(torch.randn(64))
    b.grad = torch.randn(64)
    opt = optim.AdamW([b], engine=engine)
    opt.step()
    kept = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"optimizer state 'exp_avg' \(shape \(4,\).*does not fit its parameter"):
        opt.load_state_dict(copy.deepcopy(small.state_dict()))
    torch.testing.assert_close(opt.state_dict()["state"][0]["exp_avg"], kept["state"][0]["exp_avg"])
    opt.step()  # still the optimizer it was


@pytest.mark.parametrize("engine", ALL_ENGINES)
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_state_put_in_by_hand_that_does_not_fit_raises_the_reference_engines_error(engine: str, bad: str) -> None:
    p = nn.Parameter(torch.randn(64))
    p.grad = torch.randn(64)
    opt = optim.SGD([p], lr=0.1, momentum=0.9, engine=engine)
    opt.step()
    before = p.detach().clone()
    opt.state[p]["momentum_buffer"] = torch.zeros(4) if bad == "shape" else torch.zeros(64, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"'momentum_buffer' .* does not fit its parameter"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_a_resized_checkpoint_does_not_crash_the_process() -> None:
    """The issue's repro (a million-element parameter, a 4-element state), in a process of its own."""
    script = """
        import copy, torch
        from torch import nn
        from descend import optim
        a = nn.Parameter(torch.randn(4)); a.grad = torch.randn(4); o = optim.AdamW([a]); o.step()
        sd = copy.deepcopy(o.state_dict())
        b = nn.Parameter(torch.randn(1 << 20)); b.grad = torch.randn(1 << 20); o2 = optim.AdamW([b])
        try:
            o2.load_state_dict(sd)
        except RuntimeError as err:
            print("refused:", err)
        o2.step()
    """
    result = _python(script)
    assert result.returncode == 0, result.stderr
    assert "refused: optimizer state 'exp_avg'" in result.stdout


def _python(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


# -- 2, 3. half precision: torch's CPU kernels are not trusted ------------------------------------------------
@pytest.mark.parametrize("engine", ["auto", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sgd_trains_as_torch_sgd(engine: str, dtype: torch.dtype) -> None:
    """torch 2.13's fused CPU SGD leaves half-precision weights as they are; descend steps them."""
    p = torch.zeros(64, dtype=dtype)
    grads = [[torch.ones(64, dtype=dtype)]] * 3
    out, _ = steps(lambda g, **k: optim.SGD(g, lr=0.01, momentum=0.9, **k), engine, [p], grads)
    ref, _ = steps(lambda g, **k: optim.SGD(g, lr=0.01, momentum=0.9, **k), "reference", [p], grads)
    torch_p = nn.Parameter(p.clone())
    torch_opt = torch.optim.SGD([torch_p], lr=0.01, momentum=0.9, foreach=False)
    for _ in range(3):
        torch_p.grad = torch.ones(64, dtype=dtype)
        torch_opt.step()
    assert torch.equal(bits(out[0]), bits(ref[0]))
    torch.testing.assert_close(out[0], torch_p.detach())  # torch rounds w - lr*b once, descend -lr*b first
    assert float(out[0][0]) == pytest.approx(-0.0562, abs=1e-3)


@pytest.mark.parametrize("engine", ["auto", "fused"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_bf16_state_of_bf16_parameters_is_rounded_stochastically(engine: str, name: str) -> None:
    """torch's kernels round to nearest: an EMA kept in bfloat16 stalls (v at 0.25 where it should reach 0.95)."""
    kw = {"momentum": 0.9} if name == "SGD" else {"betas": (0.9, 0.999)}

    def factory(g: Any, **k: Any) -> torch.optim.Optimizer:
        return getattr(optim, name)(g, lr=1e-6, state_dtype=torch.bfloat16, **kw, **k)

    p = torch.zeros(256, dtype=torch.bfloat16)
    grads = [[torch.ones(256, dtype=torch.bfloat16)]] * 40
    out, opt = steps(factory, engine, [p], grads)
    ref, ref_opt = steps(factory, "reference", [p], grads)
    assert torch.equal(bits(out[0]), bits(ref[0]))
    for key, value in ref_opt.state_dict()["state"][0].items():
        assert torch.equal(opt.state_dict()["state"][0][key], value), key
    if name != "SGD":  # 3000 steps: v follows 1 - 0.999^t on average
        p = nn.Parameter(torch.zeros(256, dtype=torch.bfloat16))
        opt = factory([p], engine=engine)
        for _ in range(3000):
            p.grad = torch.ones(256, dtype=torch.bfloat16)
            opt.step()
        assert float(opt.state[p]["exp_avg_sq"].float().mean()) == pytest.approx(1 - 0.999**3000, abs=0.01)


# -- 4. NaN and -0.0 in sign methods -------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_sign_of_nan_and_negative_zero_is_torchs_in_every_engine(engine: str) -> None:
    """torch.sign(nan) == 0 and torch.sign(-0.0) == +0.0: the weight keeps its value (and sign bit)."""
    grads = [[torch.tensor([1.0, 1, 1, -0.0, 0.0])], [torch.tensor([float("nan"), 1, 1, -0.0, -0.0])],
             [torch.tensor([1.0, 1, 1, 0.0, -0.0])]]
    p = torch.tensor([1.0, 1, 1, -0.0, -0.0])
    for factory in (lambda g, **k: optim.Signum(g, lr=0.1, **k), lambda g, **k: optim.SignSGD(g, lr=0.1, **k),
                    lambda g, **k: optim.Lion(g, lr=0.1, **k)):
        out, _ = steps(factory, engine, [p], grads)
        ref, _ = steps(factory, "reference", [p], grads)
        assert torch.equal(bits(out[0]), bits(ref[0])), (out[0], ref[0])
    out, _ = steps(lambda g, **k: optim.Signum(g, lr=0.1, **k), engine, [p], grads)
    torch.testing.assert_close(out[0][:3], torch.tensor([0.9, 0.7, 0.7]))


# -- 5. the kernel cache: nothing unverified runs ------------------------------------------------------------
_SIGNUM = """
    import torch
    from torch import nn
    from descend import optim
    p = nn.Parameter(torch.ones(40000))
    o = optim.Signum([p], lr=0.1, engine="native")
    for t in range(3):
        p.grad = torch.full((40000,), -1.0 if t == 1 else 1.0)
        o.step()
    assert [r.kernel for r in o.last_step_kernels] == ["native"]
    print(float(p.sum()))
"""


def _cached_kernels(cache: Path) -> list[Path]:
    return sorted((cache / "kernels").glob("step_*.so"))


@needs_cc
def test_a_truncated_kernel_in_the_cache_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    env = {"DESCEND_CACHE_DIR": str(tmp_path)}
    first = _python(_SIGNUM, env)
    assert first.returncode == 0, first.stderr
    [kernel] = _cached_kernels(tmp_path)
    whole = kernel.read_bytes()
    kernel.write_bytes(whole[: len(whole) // 2])
    again = _python(_SIGNUM, env)
    assert again.returncode == 0, again.stderr  # a loaded truncated library dies of SIGBUS (rc 135)
    assert again.stdout == first.stdout
    assert again.stderr.count("building it again") == 1 and "carries no record" in again.stderr
    assert kernel.read_bytes() == whole  # rebuilt and sealed again
    third = _python(_SIGNUM, env)
    assert third.returncode == 0 and "building it again" not in third.stderr


def _library_without_the_step(directory: Path) -> bytes:
    source = directory / "other.c"
    source.write_text("int something_else(void) { return 1; }\n")
    out = directory / "other.so"
    subprocess.run([str(CC), "-shared", "-fPIC", str(source), "-o", str(out)], check=True)
    return out.read_bytes()


@needs_cc
@pytest.mark.parametrize("sealed", [False, True])
def test_a_library_without_the_step_in_the_cache_is_rebuilt(tmp_path: Path, sealed: bool,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Without the seal it is never loaded; sealed (as descend seals), it loads but lacks the step: rebuilt."""
    env = {"DESCEND_CACHE_DIR": str(tmp_path)}
    assert _python(_SIGNUM, env).returncode == 0
    [kernel] = _cached_kernels(tmp_path)
    other = _library_without_the_step(tmp_path)
    kernel.write_bytes(native._sealed(other) if sealed else other)
    again = _python(_SIGNUM, env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("building it again") == 1
    assert ("does not load" in again.stderr) if sealed else ("no record" in again.stderr)


# -- 6. a 0-d parameter with bfloat16 state -------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["Lion", "AdamW", "Signum", "SGD"])
def test_a_0d_parameter_with_bf16_state_steps_as_the_reference(engine: str, name: str) -> None:
    kw = {"momentum": 0.9} if name == "SGD" else {}

    def factory(g: Any, **k: Any) -> torch.optim.Optimizer:
        return getattr(optim, name)(g, lr=0.01, state_dtype=torch.bfloat16, **kw, **k)

    grads = [[torch.tensor(0.3 * (t + 1))] for t in range(4)]
    out, _ = steps(factory, engine, [torch.tensor(1.0)], grads)
    ref, _ = steps(factory, "reference", [torch.tensor(1.0)], grads)
    assert out[0].shape == ()
    if name == "AdamW":  # its division and square root: within the documented ulp per step
        torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=0)
    else:
        assert torch.equal(bits(out[0]), bits(ref[0]))


# -- 7. a step counter changed in place ----------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("flat", [False, True])
def test_a_step_counter_changed_in_place_is_read(engine: str, flat: bool) -> None:
    def run(engine: str) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(10, generator=gen)) for _ in range(3)]
        opt = optim.Adam(ps, lr=0.1, engine=engine, flat=flat)
        for t in range(6):
            for p in ps:
                p.grad = torch.randn(10, generator=gen)
            opt.step()
            if t == 2:
                opt.state[ps[1]]["step"].zero_()
            if t == 4:
                for p in ps:
                    opt.state[p]["step"].fill_(100.0)
        assert [float(opt.state[p]["step"]) for p in ps] == [101.0] * 3
        return [p.detach() for p in ps]

    out, ref = run(engine), run("reference")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# -- 8. parameters that share memory -------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", ["overlapping", "listed_twice"])
def test_parameters_sharing_memory_step_in_the_reference_order(engine: str, layout: str, two_threads: None) -> None:
    buffer = torch.randn(70000, generator=torch.Generator().manual_seed(0))

    def params() -> list[nn.Parameter]:
        data = buffer.clone()
        if layout == "overlapping":
            return [nn.Parameter(data[:40000]), nn.Parameter(data[30000:])]
        p = nn.Parameter(data[:40000])
        return [p, p]

    def run(engine: str) -> torch.Tensor:
        ps = params()
        with pytest.warns(UserWarning, match="duplicate") if layout == "listed_twice" else _nothing():
            opt = optim.Lion(ps, lr=0.01, weight_decay=0.5, engine=engine)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in ps])

    assert torch.equal(bits(run(engine)), bits(run("reference")))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


# -- 9. the environment ---------------------------------------------------------------------------------------
@needs_cc
def test_cc_with_flags_is_split_as_a_shell_would(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CC", f"{CC} -O2")
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path))
    p = nn.Parameter(torch.ones(8))
    opt = optim.Signum([p], engine="native")
    for _ in range(2):
        p.grad = torch.ones(8)
        opt.step()
    assert [r.kernel for r in opt.last_step_kernels] == ["native"]


def _kernels_built(tmp_path: Path) -> None:
    p = nn.Parameter(torch.ones(8))
    opt = optim.Signum([p], engine="native")
    for _ in range(2):
        p.grad = torch.ones(8)
        opt.step()
    assert [r.kernel for r in opt.last_step_kernels] == ["native"]


@needs_cc
def test_a_cache_others_can_write_to_is_refused_and_the_log_says_why(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "shared" / "kernels").mkdir(parents=True)
    (tmp_path / "shared" / "kernels").chmod(0o777)
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path / "shared"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "private-tmp"))
    monkeypatch.setattr(native, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="descend.optim"):
        _kernels_built(tmp_path)
    assert any("not keeping compiled kernels in" in r.message and "other users can write to it (mode 777)"
               in r.message for r in caplog.records)
    assert not list((tmp_path / "shared" / "kernels").glob("*.so"))
    assert list((tmp_path / "private-tmp").glob("descend-kernels-*/*.so"))


@needs_cc
def test_a_read_only_cache_falls_back_to_the_temporary_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache" / "kernels"
    cache.mkdir(parents=True)
    monkeypatch.setenv("DESCEND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "private-tmp"))
    monkeypatch.setattr(native, "_logged", set())

    def read_only(*args: Any, **kwargs: Any) -> Any:  # as a read-only file system answers (root ignores modes)
        raise PermissionError(13, "Read-only file system")

    real = native.atomic_write
    monkeypatch.setattr(native, "atomic_write",
                        lambda path, *a, **k: read_only() if Path(path).parent == cache else real(path, *a, **k))
    with caplog.at_level(logging.WARNING, logger="descend.optim"):
        _kernels_built(tmp_path)
    assert any("cannot store compiled kernels in" in r.message for r in caplog.records)
    assert not list(cache.glob("*.so"))
    assert list((tmp_path / "private-tmp").glob("descend-kernels-*/*.so"))


@pytest.mark.parametrize("copy_by", ["load_state_dict", "pickle"])
def test_a_hyperparameter_written_after_loading_state_takes_effect(copy_by: str) -> None:
    """Found by the differential property test: after ``load_state_dict`` (or unpickling), a value written to
    the rule's own key (``beta``) was overwritten by the loaded ``momentum`` alias at the next step."""
    p = nn.Parameter(torch.tensor(1.0))
    first = optim.Momentum([p], lr=0.1, beta=0.9)
    p.grad = torch.tensor(1.0)
    first.step()  # m = 0.1
    if copy_by == "pickle":
        opt = pickle.loads(pickle.dumps(first))
        p = opt.param_groups[0]["params"][0]
    else:
        opt = optim.Momentum([p], lr=0.1, beta=0.9)
        opt.load_state_dict(copy.deepcopy(first.state_dict()))
    opt.param_groups[0]["beta"] = 0.5
    p.grad = torch.tensor(1.0)
    opt.step()
    assert opt.state[p]["exp_avg"].item() == pytest.approx(0.5 * 0.1 + 0.5 * 1.0)
    assert opt.param_groups[0]["momentum"] == 0.5


def test_bfloat16_state_of_float16_parameters_survives_a_state_dict_round_trip() -> None:
    """Found by the differential property test: torch casts loaded state to the parameter's dtype, and a
    bfloat16 ``exp_avg_sq`` of 1e-12 does not survive float16 (it became 0)."""
    p = nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = optim.Adam([p], lr=1e-3, state_dtype=torch.bfloat16)
    p.grad = torch.full((4,), 3e-5, dtype=torch.float16)
    opt.step()
    again = optim.Adam([p], lr=1e-3, state_dtype=torch.bfloat16)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("exp_avg", "exp_avg_sq"):
        assert again.state[p][key].dtype == torch.bfloat16
        assert torch.equal(again.state[p][key], opt.state[p][key])
    assert again.state[p]["exp_avg_sq"].min() > 0
