"""torch's own optimizer scenarios, run against descend's SGD, Adam and AdamW.

descend's classes are registered as ``OptimizerInfo`` entries built from torch's ``optim_db``
(``torch.testing._internal.common_optimizers``): torch's input generators (every constructor
configuration torch tests), error inputs and scheduler sets, with descend's classes in place of
torch's. The scenarios follow torch's ``test/test_optim.py`` (which the wheel does not ship): each
is written here again, driving every configuration, plus torch's global flags ``foreach=False``,
``foreach=True`` and ``fused=True``, through it. Scenarios that test a torch internal, or a
feature descend declines with a clear error, are listed at the end with the reason.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

from descend import optim

DEVICE = "cpu"
DTYPE = torch.float32
NAMES = ("SGD", "Adam", "AdamW")
_TORCH_INFOS = {info.optim_cls.__name__: info for info in optim_db}


def descend_info(name: str) -> OptimizerInfo:
    """torch's ``OptimizerInfo`` for ``name`` with descend's class: torch's inputs, errors and schedulers."""
    torch_info = _TORCH_INFOS[name]
    return OptimizerInfo(
        getattr(optim, name),
        optim_inputs_func=torch_info.optim_inputs_func,
        optim_error_inputs_func=torch_info.optim_error_inputs_func,
        scheduler_inputs=torch_info.scheduler_inputs,
        supported_impls=("foreach", "fused"),
        supports_fused_on=("cpu", "cuda"),
        not_og_supported_flags=torch_info.not_og_supported_flags,
        supports_sparse=False,
        supports_complex=False,
        has_capturable_arg=False,
    )


DESCEND_DB = {name: descend_info(name) for name in NAMES}


@pytest.fixture(params=NAMES)
def info(request: pytest.FixtureRequest) -> OptimizerInfo:
    return DESCEND_DB[request.param]


def all_inputs(info: OptimizerInfo) -> list[OptimizerInput]:
    """Every configuration, each also with ``foreach=False``, ``foreach=True`` and ``fused=True``."""
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, DTYPE, info)


def linear_problem(contiguous: bool = True, seed: int = 0) -> tuple[Parameter, Parameter, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = Parameter(torch.randn(2, 3, generator=gen))
    else:  # a strided view: every third element of a larger tensor
        weight = Parameter(torch.randn(2, 3, 2, generator=gen)[..., 0])
    bias = Parameter(torch.randn(2, generator=gen))
    return weight, bias, torch.randn(3, generator=gen)


def fwd_bwd(opt: torch.optim.Optimizer, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = (weight.mv(x) + bias).pow(2).sum()
    loss.backward()
    return loss


def assert_goes_right_direction(opt: torch.optim.Optimizer, weight: torch.Tensor, bias: torch.Tensor,
                                 x: torch.Tensor, maximize: bool, desc: str, schedulers: Any = ()) -> None:
    """20 closure steps (each followed by the schedulers' steps) lower the loss, or raise it when maximising."""
    closure = functools.partial(fwd_bwd, opt, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        loss = opt.step(closure)
        for scheduler in schedulers:
            scheduler.step(loss.item()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
    final = closure().item()
    assert (final > initial) if maximize else (final < initial), desc


def assert_equal(a: Any, b: Any) -> None:
    """Nested dicts/lists/tuples equal, tensors by ``torch.testing.assert_close`` (default tolerances)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (a, b)
        for key in a:
            assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    elif torch.is_tensor(a) or torch.is_tensor(b):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b))
    else:
        assert a == b, (a, b)


# -- torch's scenarios ---------------------------------------------------------------------------------
def test_optim_infos_do_not_specify_global_cliquey_kwargs(info: OptimizerInfo) -> None:
    for optim_input in info.optim_inputs_func(DEVICE):
        assert not {"foreach", "fused", "differentiable"} & optim_input.kwargs.keys()


#: torch's error inputs that descend accepts, because it computes them: with the reason.
ACCEPTED = {
    "lr as Tensor doesn't work with foreach & not capturable": "every descend engine takes a Tensor lr",
    "betas must be either both floats or both Tensors": "descend takes any mix of floats and 0-d Tensors",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True":
        "every descend engine takes Tensor betas",
}


def test_errors(info: OptimizerInfo) -> None:
    """torch's invalid inputs raise the same exception type (descend's own message names the argument)."""
    checked = 0
    for error_input in info.optim_error_inputs_func(device=DEVICE, dtype=DTYPE):
        optim_input = error_input.optimizer_error_input
        if optim_input.desc in ACCEPTED:
            continue
        params, kwargs = optim_input.params, optim_input.kwargs
        if params is None:
            params = [Parameter(torch.randn(1, 1))]
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    info.optim_cls(params, **kwargs)
            else:
                with pytest.raises(error_input.error_type):
                    info.optim_cls(params, **kwargs)
        else:
            opt = info.optim_cls(params, **kwargs)
            with pytest.raises(error_input.error_type):
                opt.step()
        checked += 1
    assert checked >= 6


def test_accepted_error_inputs_compute_what_floats_compute() -> None:
    """The inputs torch rejects and descend accepts (tensor lr and betas with foreach) step as floats do."""
    out = []
    for lr, betas in ((1e-2, (0.9, 0.99)), (torch.tensor(1e-2), (torch.tensor(0.9), 0.99))):
        weight, bias, x = linear_problem()
        opt = optim.Adam([weight, bias], lr=lr, betas=betas, foreach=True)
        for _ in range(5):
            opt.step(functools.partial(fwd_bwd, opt, weight, bias, x))
        out.append([weight.detach(), bias.detach()])
    assert_equal(out[0], out[1])


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_lrsched", [False, True])
def test_forloop_goes_right_direction(info: OptimizerInfo, contiguous: bool, with_lrsched: bool) -> None:
    schedulers_list = info.scheduler_inputs if with_lrsched else [[]]
    for schedulers_c in schedulers_list:
        for optim_input in all_inputs(info):
            weight, bias, x = linear_problem(contiguous)
            opt = info.optim_cls([weight, bias], **optim_input.kwargs)
            schedulers = [make(opt) for make in schedulers_c]
            assert_goes_right_direction(opt, weight, bias, x, optim_input.kwargs.get("maximize", False),
                                        optim_input.desc, schedulers)


@pytest.mark.parametrize("with_lrsched", [False, True])
def test_param_group_with_lrscheduler_goes_right_direction(info: OptimizerInfo, with_lrsched: bool) -> None:
    for schedulers_c in (info.scheduler_inputs if with_lrsched else [[]]):
        for optim_input in all_inputs(info):
            weight, bias, x = linear_problem()
            kwargs = dict(optim_input.kwargs)
            group_lr = kwargs.pop("lr", None)
            bias_lr = 0.01 if not torch.is_tensor(group_lr) else torch.tensor(0.01)
            opt = info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": bias_lr}],
                                 **({"lr": group_lr} if group_lr is not None else {}), **kwargs)
            schedulers = [make(opt) for make in schedulers_c]
            assert_goes_right_direction(opt, weight, bias, x, kwargs.get("maximize", False), optim_input.desc,
                                        schedulers)


def test_tensor_lr(info: OptimizerInfo) -> None:
    """A 0-d Tensor lr steps exactly as the same float."""
    for optim_input in all_inputs(info):
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "lr"}
        lr = float(optim_input.kwargs.get("lr", 1e-3))
        out = []
        for value in (lr, torch.tensor(lr)):
            weight, bias, x = linear_problem()
            opt = info.optim_cls([weight, bias], lr=value, **kwargs)
            for _ in range(5):
                opt.step(functools.partial(fwd_bwd, opt, weight, bias, x))
            out.append([weight.detach(), bias.detach()])
        assert_equal(out[0], out[1])


def test_correctness_of_every_implementation(info: OptimizerInfo) -> None:
    """foreach=False (reference), foreach=True and fused=True take the same steps (torch's ``test_correctness``)."""
    for optim_input in info.optim_inputs_func(DEVICE):
        out = []
        for flags in ({"foreach": False}, {"foreach": True}, {"fused": True}, {}):
            weight, bias, x = linear_problem()
            opt = info.optim_cls([weight, bias], **optim_input.kwargs, **flags)
            for _ in range(10):
                opt.step(functools.partial(fwd_bwd, opt, weight, bias, x))
            out.append(([weight.detach(), bias.detach()], opt.state_dict()["state"]))
        for other in out[1:]:
            assert_equal(out[0], other)


def test_fused_matches_torch_fused(info: OptimizerInfo) -> None:
    """descend's fused=True against torch's own class with fused=True, configuration by configuration."""
    torch_cls = _TORCH_INFOS[info.optim_cls.__name__].optim_cls
    for optim_input in info.optim_inputs_func(DEVICE):
        out = []
        for cls in (info.optim_cls, torch_cls):
            weight, bias, x = linear_problem()
            lr = inspect.signature(torch_cls).parameters["lr"].default  # torch's, where its inputs leave lr out
            opt = cls([weight, bias], **{"lr": lr, **optim_input.kwargs}, fused=True)
            for _ in range(10):
                opt.step(functools.partial(fwd_bwd, opt, weight, bias, x))
            out.append([weight.detach(), bias.detach()])
        assert_equal(out[0], out[1])


def test_fused_does_not_step_if_foundinf(info: OptimizerInfo) -> None:
    for optim_input in all_inputs(info):
        params = [Parameter(torch.ones(3, 2)) for _ in range(3)]
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        opt = info.optim_cls(params, **optim_input.kwargs)
        opt.grad_scale = torch.ones(())
        opt.found_inf = torch.ones(())
        opt.step()
        assert_equal([p.detach() for p in params], before)
        assert all(len(opt.state[p]) == 0 for p in params), optim_input.desc


def test_step_is_noop_when_params_have_no_grad(info: OptimizerInfo) -> None:
    params = [torch.randn(2, 3, requires_grad=True) for _ in range(2)]
    before = [p.detach().clone() for p in params]
    for optim_input in all_inputs(info):
        opt = info.optim_cls(params, **optim_input.kwargs)
        opt.step(lambda: torch.tensor([1.0]))
        assert_equal([p.detach() for p in params], before)
        assert len(opt.state) == 0


def test_step_is_noop_for_zero_grads(info: OptimizerInfo) -> None:
    param = torch.randn((5, 1), requires_grad=True)
    before = param.detach().clone()
    for optim_input in all_inputs(info):
        kwargs = dict(optim_input.kwargs)
        if kwargs.get("weight_decay", 0) != 0:
            continue  # decay moves the weights without a gradient
        if info.optim_cls.__name__ == "AdamW":  # AdamW's default decay: make it invisible, as torch does
            kwargs["lr"] = torch.tensor(1e-5) if torch.is_tensor(kwargs.get("lr")) else 1e-5
        opt = info.optim_cls([param], **kwargs)
        param.grad = torch.zeros_like(param)
        opt.step(lambda: torch.tensor([1.0]))
        assert_equal(param.detach(), before)


def test_optimizer_can_be_printed(info: OptimizerInfo) -> None:
    for optim_input in all_inputs(info):
        text = repr(info.optim_cls([Parameter(torch.randn(2, 3))], **optim_input.kwargs))
        assert info.optim_cls.__name__ in text


def test_state_dict_deterministic(info: OptimizerInfo) -> None:
    for optim_input in all_inputs(info):
        weight, bias, x = linear_problem()
        opt = info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, opt, weight, bias, x)
        for _ in range(10):
            opt.step(closure)
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        opt_c = info.optim_cls([weight_c, bias_c], **optim_input.kwargs)
        closure_c = functools.partial(fwd_bwd, opt_c, weight_c, bias_c, x)
        opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(10):
            opt.step(closure)
            opt_c.step(closure_c)
            assert_equal([weight, bias], [weight_c, bias_c])
        assert_equal(opt.state_dict(), opt_c.state_dict())
        opt_c.param_groups.extend(opt_c.param_groups)  # repeated groups state_dict the same (torch #36831)
        assert_equal(opt.state_dict()["param_groups"][-1], opt_c.state_dict()["param_groups"][-1])


def test_can_load_older_state_dict(info: OptimizerInfo) -> None:
    """A state_dict saved before torch had the newer flags (no ``foreach``, ``maximize``, ... keys) loads and steps."""
    for optim_input in all_inputs(info):
        weight, bias, x = linear_problem()
        opt = info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, opt, weight, bias, x)
        for _ in range(3):
            opt.step(closure)
        old = copy.deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        opt.load_state_dict(old)
        assert opt.param_groups[0]["maximize"] == optim_input.kwargs.get("maximize", False)
        opt.step(closure)


def test_load_nontensor_step(info: OptimizerInfo) -> None:
    """torch before 1.12 saved ``step`` as a Python number; such a state_dict loads and steps as the tensor one."""
    for optim_input in all_inputs(info):
        outs = []
        for as_number in (False, True):
            weight, bias, x = linear_problem()
            opt = info.optim_cls([weight, bias], **optim_input.kwargs)
            closure = functools.partial(fwd_bwd, opt, weight, bias, x)
            for _ in range(3):
                opt.step(closure)
            state_dict = opt.state_dict()
            if as_number:
                for p_state in state_dict["state"].values():
                    p_state["step"] = p_state["step"].item()
            opt.load_state_dict(state_dict)
            opt.step(closure)
            assert all(torch.is_tensor(s["step"]) and float(s["step"]) == 4 for s in opt.state.values())
            outs.append([weight.detach(), bias.detach()])
        assert_equal(outs[0], outs[1])


def test_save_load_equality_with_weights_only(info: OptimizerInfo) -> None:
    for optim_input in all_inputs(info):
        weight, bias, x = linear_problem()
        opt = info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, opt, weight, bias, x)
        for _ in range(3):
            opt.step(closure)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        assert_equal(loaded, opt.state_dict())
        opt.load_state_dict(loaded)
        opt.step(closure)


def test_deepcopy_copies_all_public_attrs(info: OptimizerInfo) -> None:
    for optim_input in all_inputs(info):
        opt = info.optim_cls([Parameter(torch.randn(2, 3))], **optim_input.kwargs)

        def public(obj: Any) -> set[str]:
            return {k for k in obj.__dict__ if not k.startswith("_")}

        copied = copy.deepcopy(opt)
        assert public(opt) == public(copied)
        for name in public(opt) - {"state", "param_groups", "flat_layout"}:
            assert repr(getattr(opt, name)) == repr(getattr(copied, name)), name


def test_step_hooks(info: OptimizerInfo) -> None:
    """Global and per-optimizer step pre/post hooks run in torch's order; a removed hook no longer runs."""
    weight, bias, x = linear_problem()
    opt = info.optim_cls([weight, bias])
    calls: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
    ]
    try:
        opt.step(functools.partial(fwd_bwd, opt, weight, bias, x))
        assert calls == ["global pre", "pre", "post", "global post"]
    finally:
        for handle in handles:
            handle.remove()
    opt.step(functools.partial(fwd_bwd, opt, weight, bias, x))
    assert len(calls) == 4


def test_state_dict_and_load_state_dict_hooks(info: OptimizerInfo) -> None:
    weight, bias, x = linear_problem()
    opt = info.optim_cls([weight, bias], lr=0.1)
    opt.step(functools.partial(fwd_bwd, opt, weight, bias, x))
    opt.register_state_dict_pre_hook(lambda o: o.state[weight].__setitem__("seen", torch.tensor(1.0)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 7})
    state_dict = opt.state_dict()
    assert state_dict["extra"] == 7 and float(state_dict["state"][0]["seen"]) == 1.0
    opt2 = info.optim_cls([weight, bias], lr=0.1)
    seen: list[str] = []
    opt2.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt2.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
    opt2.load_state_dict(state_dict)
    assert seen == ["loaded"] and float(opt2.state[weight]["step"]) == 1.0


def test_non_empty_state(info: OptimizerInfo) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sigmoid(), torch.nn.Linear(2, 1), torch.nn.Sigmoid())
    x = torch.randn(10, 2)
    for optim_input in all_inputs(info):
        opt = info.optim_cls(model.parameters(), **optim_input.kwargs)
        for _ in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        assert opt.state and all(len(state) > 0 for state in opt.state.values())


def test_param_groups_weight_decay_and_lr(info: OptimizerInfo) -> None:
    """Per-group weight decay and learning rate, as torch's ``test_param_groups_weight_decay``/``_lr``."""
    for optim_input in all_inputs(info):
        weight, bias, x = linear_problem()
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k not in ("weight_decay", "lr")}
        opt = info.optim_cls([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "lr": 0.01}], **kwargs)
        assert_goes_right_direction(opt, weight, bias, x, kwargs.get("maximize", False), optim_input.desc)
        assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["lr"] == 0.01


def test_step_counter_follows_default_dtype(info: OptimizerInfo) -> None:
    """As torch: ``step`` is float32, or float64 when that is the default dtype (torch's foreach test)."""
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        weight, bias, x = linear_problem()
        for flags in ({"foreach": False}, {"foreach": True}):
            opt = info.optim_cls([weight, bias], **flags)
            opt.step(functools.partial(fwd_bwd, opt, weight, bias, x))
            assert all(s["step"].dtype == torch.float64 for s in opt.state.values())
    finally:
        torch.set_default_dtype(default)


def test_complex_and_sparse_raise_clearly(info: OptimizerInfo) -> None:
    """torch's complex and sparse scenarios: descend declines both with an error naming the way out."""
    p = Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="view_as_real"):
        info.optim_cls([p]).step()
    q = Parameter(torch.randn(4))
    q.grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="dense gradients"):
        info.optim_cls([q]).step()


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_capturable_and_differentiable_raise_naming_torch(info: OptimizerInfo, flag: str) -> None:
    with pytest.raises(ValueError, match=f"{flag}=True.*torch.optim"):
        info.optim_cls([Parameter(torch.randn(2))], **{flag: True})
    info.optim_cls([Parameter(torch.randn(2))], **{flag: False})  # False is torch's default: accepted


#: torch's scenarios that do not apply to descend, with the reason.
NOT_APPLICABLE = {
    "test_complex / test_complex_2d / test_rosenbrock_sparse": "descend raises on complex parameters and sparse "
    "gradients (test_complex_and_sparse_raise_clearly)",
    "test_differentiable / test_capturable*": "descend steps under no_grad and reads the step on the host; both "
    "flags raise with the alternative (test_capturable_and_differentiable_raise_naming_torch)",
    "test_defaults_changed_to_foreach": "mocks torch's private _single_tensor_/_multi_tensor_ functions",
    "test_peak_memory_foreach / test_foreach_large_tensor": "measure torch's CUDA caching allocator",
    "test_cpu_load_state_dict / test_state_dict_with_cuda_params / test_fused_cpu_matches_cuda / "
    "test_forloop_goes_right_direction_multigpu / test_mixed_device_dtype": "need a CUDA device",
    "test_grad_scaling_autocast*": "covered by tests/test_engines.py::test_grad_scaler_matches_unscaled_and_skips_inf",
}


# -- the three defects torch's scenarios found -----------------------------------------------------------
def _param(seed: int = 0) -> Parameter:
    gen = torch.Generator().manual_seed(seed)
    p = Parameter(torch.randn(3, generator=gen))
    p.grad = torch.randn(3, generator=gen)
    return p


@pytest.mark.parametrize("engine", ["reference", "foreach", "auto"])
def test_repro_python_number_step_loads(engine: str) -> None:
    p = _param()
    o = optim.Adam([p], engine=engine)
    o.step()
    sd = o.state_dict()
    sd["state"][0]["step"] = 1.0
    o.load_state_dict(sd)
    o.step()
    assert torch.is_tensor(o.state[p]["step"]) and float(o.state[p]["step"]) == 2.0


def test_repro_load_state_dict_adds_no_keys() -> None:
    p, q = _param(0), _param(1)
    a = optim.SGD([p], lr=0.1)
    a.step()
    b = optim.SGD([q], lr=0.1)
    b.load_state_dict(a.state_dict())
    assert b.state_dict()["param_groups"] == a.state_dict()["param_groups"]
    assert "differentiable" not in b.state_dict()["param_groups"][0]


def test_repro_deepcopy_keeps_decoupled_weight_decay() -> None:
    for cls, expected in ((optim.AdamW, True), (optim.Adam, False)):
        assert copy.deepcopy(cls([_param()])).decoupled_weight_decay is expected


def test_torch_style_flags_choose_engines() -> None:
    p = [_param()]
    engines: dict[str, Callable[..., torch.optim.Optimizer]] = {
        "auto": lambda: optim.AdamW(p, foreach=None, fused=None),
        "fused": lambda: optim.AdamW(p, fused=True),
        "foreach": lambda: optim.SGD(p, foreach=True),
        "reference": lambda: optim.Adam(p, foreach=False),
    }
    for name, make in engines.items():
        assert make().engine == name
    with pytest.raises(ValueError, match="cannot be set together"):
        optim.Adam(p, foreach=True, fused=True)
    with pytest.raises(ValueError, match="none of them"):
        optim.chain(p, optim.sign(), fused=True)
    with pytest.raises(ValueError, match="conflicts"):
        optim.Adam(p, engine="compiled", foreach=True)
