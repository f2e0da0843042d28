"""The torch.optim contract: state_dict round trips, schedulers, param groups, dtypes, edge cases, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from descend import optim

ALL = {
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
    "momentum": dict(lr=0.05, beta=0.9),
    "signsgd": dict(lr=1e-3, weight_decay=0.1),
    "signum": dict(lr=1e-3, weight_decay=0.1),
    "softsign": dict(lr=1e-3, eps=1e-3),
    "lion": dict(lr=1e-3, weight_decay=0.1),
    "adam": dict(lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "adamw": dict(lr=1e-2),
}


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def _groups(model: nn.Module) -> list[dict]:
    """No decay on biases, as trainers usually do."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        dtype = next(model.parameters()).dtype
        x = torch.randn(16, 4, generator=gen).to(dtype)
        y = torch.randn(16, 2, generator=gen).to(dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", sorted(ALL))
def test_state_dict_round_trip_continues_bit_exactly(name: str) -> None:
    straight = _model()
    opt = optim.create(name, _groups(straight), **ALL[name])
    _train(straight, opt, 10)

    resumed = _model()
    opt2 = optim.create(name, _groups(resumed), **ALL[name])
    _train(resumed, opt2, 5)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # nothing in the state needs pickle

    fresh = _model(seed=123)
    fresh.load_state_dict(saved["model"])
    opt3 = optim.create(name, _groups(fresh), **ALL[name])
    opt3.load_state_dict(saved["opt"])
    _train(fresh, opt3, 5, start=5)
    for a, b in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("make_torch", "make_descend"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: optim.SGD(p, lr=0.1, momentum=0.9)),
        (lambda p: torch.optim.Adam(p, lr=0.05), lambda p: optim.Adam(p, lr=0.05)),
    ],
    ids=["sgd", "adam"],
)
@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle", "warmup"])
def test_lr_schedulers_work_unchanged(make_torch, make_descend, schedule: str) -> None:
    def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        if schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        if schedule == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        if schedule == "onecycle":  # also cycles momentum / betas through the param groups
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=20)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 5))

    results = []
    for make in (make_torch, make_descend):
        model = _model(dtype=torch.float64)
        opt = make(model.parameters())
        sched = make_scheduler(opt)
        lrs = []
        for t in range(20):
            _train(model, opt, 1, start=t)
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        results.append((lrs, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_bfloat16_parameters_follow_torch_adamw() -> None:
    results = []
    for make in (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: optim.AdamW(p, lr=1e-2, param_rounding="nearest")):
        model = _model(dtype=torch.bfloat16)
        opt = make(model.parameters())
        _train(model, opt, 20)
        results.append([p.detach().float() for p in model.parameters()])
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)
    model = _model(dtype=torch.bfloat16)
    opt = optim.Lion(model.parameters(), lr=1e-3)
    _train(model, opt, 3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert opt.state[next(model.parameters())]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(ALL))
def test_grad_none_and_zero_size_parameters_in_one_group(name: str) -> None:
    used = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    empty = torch.zeros(0, 4, requires_grad=True)
    before = unused.detach().clone()
    opt = optim.create(name, [used, unused, empty], **ALL[name])
    for _ in range(3):
        opt.zero_grad()
        (used.sum() + empty.sum()).backward()
        opt.step()
    assert torch.equal(unused.detach(), before)
    assert unused not in opt.state
    assert empty.shape == (0, 4)
    assert not torch.equal(used.detach(), torch.zeros(3))


def test_closure_is_evaluated_with_grad_enabled() -> None:
    w = torch.tensor([3.0], requires_grad=True)
    opt = optim.SGD([w], lr=0.5)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 9.0
    assert w.item() == pytest.approx(0.0)


def test_sparse_and_complex_gradients_give_clear_errors() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optim.Adam(emb.parameters()).step()
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    z.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex parameters"):
        optim.AdamW([z]).step()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: optim.SGD(p, lr=-0.1), r"lr must be in \[0"),
        (lambda p: optim.Adam(p, betas=(1.0, 0.9)), r"betas\[0\] must be in \[0.0, 1.0\)"),
        (lambda p: optim.Adam(p, betas=(0.9,)), "betas must be a pair"),
        (lambda p: optim.Lion(p, betas=(0.9, -0.1)), r"betas\[1\]"),
        (lambda p: optim.Adam(p, eps=0.0), r"eps must be in \(0"),
        (lambda p: optim.Softsign(p, eps=-1.0), r"eps must be in \(0"),
        (lambda p: optim.Momentum(p, beta=1.5), r"beta must be in \[0.0, 1.0\)"),
        (lambda p: optim.SGD(p, momentum=-0.5), "momentum must be in"),
        (lambda p: optim.SGD(p, nesterov=True), "nesterov=True requires momentum > 0"),
        (lambda p: optim.AdamW(p, weight_decay=-1.0), "weight_decay must be in"),
        (lambda p: optim.Adam(p, constraint="box"), "needs a radius"),
        (lambda p: optim.Adam(p, constraint="sphere", radius=1.0), "constraint must be 'box' or 'ball'"),
        (lambda p: optim.Adam(p, engine="magic"), "engine must be one of"),
        (lambda p: optim.chain(p, optim.ema(0.9), gamma=0.5), r"unknown hyperparameter\(s\) \['gamma'\]"),
        (lambda p: optim.chain(p, optim.sign(), optim.clip_by_global_norm(1.0)), "must be the first rule"),
        (lambda p: optim.create("adagrad", p), "unknown optimizer 'adagrad'"),
        (lambda p: optim.Adam([{"params": p, "lr": float("nan")}]), "lr must be a number"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_them(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make([torch.zeros(2, requires_grad=True)])


def test_per_group_hyperparameters_are_validated_too() -> None:
    opt = optim.AdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "weight_decay": -0.1})


def test_explain_lists_the_equations_with_group_values() -> None:
    model = _model()
    opt = optim.AdamW(_groups(model), lr=3e-4, weight_decay=0.05)
    text = optim.explain(opt)
    assert "m ← β1·m + (1−β1)·u" in text
    assert "w ← (1 − lr·λ)·w" in text
    assert "lr=0.0003" in text and "weight_decay=0.05" in text
    assert "group 1: weight_decay=0" in text
    assert "state per parameter: step, exp_avg, exp_avg_sq" in text
    assert "u ← sign(u)" in optim.explain(optim.Signum(model.parameters()))
    plain = optim.explain(optim.SGD(model.parameters(), lr=0.1)).splitlines()
    assert [line.split()[1] for line in plain if "off at these values" in line] == ["l2", "heavy_ball"]
    lion = optim.explain(optim.Lion(model.parameters(), weight_decay=0.0)).splitlines()
    assert [line.split()[1] for line in lion if "off at these values" in line] == ["decoupled_decay"]
    decayed = optim.explain(optim.Lion(model.parameters(), weight_decay=0.1))
    assert "off at these values" not in decayed


def test_constraint_state_reports_the_implied_box() -> None:
    w = torch.tensor([0.5, -2.0, 1.99, 0.0], requires_grad=True)
    state = optim.constraint_state(optim.Lion([w], lr=0.01, weight_decay=0.5))[0]
    assert state["radius"] == pytest.approx(2.0)
    assert state["max_abs_weight"] == pytest.approx(2.0)
    assert state["max_abs_weight_over_radius"] == pytest.approx(1.0)
    assert state["fraction_at_bound"] == pytest.approx(0.5)  # |w| >= radius - lr
    assert optim.constraint_state(optim.AdamW([w], weight_decay=0.5))[0]["radius"] is None
    assert optim.constraint_state(optim.Adam([w], constraint="box", radius=3.0))[0]["radius"] == 3.0


def test_deepcopy_keeps_the_chain_and_continues_identically() -> None:
    model = _model()
    opt = optim.Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    _train(model, opt, 2)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    assert "lion" in repr(opt_copy) and opt_copy.param_groups[0]["lr"] == 1e-3
    _train(model, opt, 3, start=2)
    _train(model_copy, opt_copy, 3, start=2)
    for a, b in zip(model.parameters(), model_copy.parameters()):
        assert torch.equal(a, b)


def test_drop_in_for_a_torch_training_loop() -> None:
    """A standard loop, swapping torch.optim.AdamW for descend's, fits a linear map."""
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    y = x @ torch.randn(5, 1)
    model = nn.Linear(5, 1)
    opt = optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(300):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 1e-4


# -- torch's momentum-cycling schedulers and an ema's beta ----------------------------------------
EMA_CHAINS = {
    "momentum": lambda p: optim.Momentum(p, lr=0.05),
    "signum": lambda p: optim.Signum(p, lr=0.05, weight_decay=0.1),
    "softsign": lambda p: optim.Softsign(p, lr=0.05, eps=1e-3),
    "chain": lambda p: optim.chain(p, optim.ema(0.9), optim.sign(), lr=0.05),
}


def _cycling(opt: torch.optim.Optimizer, kind: str) -> torch.optim.lr_scheduler.LRScheduler:
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=25)
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=4)


def _run_ema(make, steps: int, kind: str | None = None, by_hand: list[tuple[float, float]] | None = None,
             ) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """``steps`` steps on fixed random gradients; with a scheduler, or with ``(lr, beta)`` set by hand."""
    w = nn.Parameter(torch.linspace(-1, 1, 12, dtype=torch.float64))
    opt = make([w])
    sched = _cycling(opt, kind) if kind else None
    used = []
    for t in range(steps):
        if by_hand is not None:
            opt.param_groups[0]["lr"], opt.param_groups[0]["beta"] = by_hand[t]
        w.grad = torch.randn(12, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        opt.step()
        used.append((opt.param_groups[0]["lr"], opt.param_groups[0]["beta"]))
        if sched is not None:
            sched.step()
    return w.detach().clone(), used


@pytest.mark.parametrize("kind", ["onecycle", "cyclic"])
@pytest.mark.parametrize("name", sorted(EMA_CHAINS))
def test_momentum_cycling_schedulers_drive_an_ema_beta(name: str, kind: str) -> None:
    """OneCycleLR and CyclicLR (cycle_momentum=True) write ``momentum``; the ema's beta follows it: the run
    equals one whose lr and beta are set by hand each step, and differs from one whose beta stays put."""
    make = EMA_CHAINS[name]
    scheduled, used = _run_ema(make, 20, kind)
    assert len({beta for _, beta in used}) > 3  # the beta was cycled
    by_hand, _ = _run_ema(make, 20, by_hand=used)
    assert torch.equal(scheduled, by_hand)
    fixed_beta, _ = _run_ema(make, 20, by_hand=[(lr, 0.9) for lr, _ in used])
    assert not torch.equal(scheduled, fixed_beta)


def test_momentum_key_follows_whichever_key_was_written() -> None:
    w = nn.Parameter(torch.ones(3))
    opt = optim.Signum([w], lr=0.1, beta=0.8)
    group = opt.param_groups[0]
    assert group["momentum"] == group["beta"] == 0.8 and opt.defaults["momentum"] == 0.8
    w.grad = torch.ones(3)
    group["momentum"] = 0.5  # a scheduler
    opt.step()
    assert group["beta"] == group["momentum"] == 0.5
    group["beta"] = 0.7  # by hand
    opt.step()
    assert group["beta"] == group["momentum"] == 0.7
    group["momentum"] = 1.5
    with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\), got 1.5"):
        opt.step()
    opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "momentum": 0.3})
    assert opt.param_groups[1]["beta"] == 0.3
    with pytest.raises(ValueError, match="name one hyperparameter"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "momentum": 0.3, "beta": 0.4})


def test_chains_with_their_own_momentum_or_betas_and_without_any_are_left_alone() -> None:
    w = [nn.Parameter(torch.ones(2))]
    assert "momentum" not in optim.Adam(w).defaults and "beta" not in optim.Adam(w).defaults
    assert optim.SGD(w, momentum=0.9).defaults["momentum"] == 0.9
    assert "momentum" not in optim.Lion(w).defaults
    with pytest.raises(ValueError, match="optimizer must support momentum or beta1"):  # nothing to cycle
        torch.optim.lr_scheduler.OneCycleLR(optim.SignSGD(w), max_lr=0.1, total_steps=10)


def test_resume_mid_cycle_continues_identically_and_old_state_dicts_load() -> None:
    """Saved after ``sched.step()`` wrote the next momentum, restored into fresh objects: the same run."""
    def fresh() -> tuple[nn.Parameter, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        w = nn.Parameter(torch.linspace(-1, 1, 12, dtype=torch.float64))
        opt = optim.Signum([w], lr=0.05)
        return w, opt, _cycling(opt, "onecycle")

    def train(w, opt, sched, steps: range) -> None:
        for t in steps:
            w.grad = torch.randn(12, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
            opt.step()
            sched.step()

    straight = fresh()
    train(*straight, range(20))
    first = fresh()
    train(*first, range(8))
    buffer = io.BytesIO()
    torch.save({"w": first[0].detach(), "opt": first[1].state_dict(), "sched": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["param_groups"][0]["momentum"] != saved["opt"]["param_groups"][0]["beta"]  # pending
    second = fresh()
    with torch.no_grad():
        second[0].copy_(saved["w"])
    second[1].load_state_dict(saved["opt"])
    second[2].load_state_dict(saved["sched"])
    train(*second, range(8, 20))
    assert torch.equal(second[0], straight[0])

    old = copy.deepcopy(saved["opt"])  # saved before the key existed: the beta it holds is the one used
    for group in old["param_groups"]:
        group.pop("momentum")
    group["beta"] = 0.75
    _, opt, _ = fresh()
    opt.load_state_dict(old)
    assert opt.param_groups[0]["momentum"] == opt.param_groups[0]["beta"] == 0.75
