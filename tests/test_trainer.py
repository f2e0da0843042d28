"""The training loop against independent references: autograd on the whole set, hand-computed steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from descend import optim
from descend.data._base import DataBundle, Split
from descend.train import (
    FullBatch,
    Minibatch,
    NonFiniteLossError,
    Schedule,
    TrainConfig,
    Trainer,
    accumulate_gradient,
    cross_entropy,
    l2_penalty,
    mse,
)


def _bundle(m: int = 37, f: int = 5, classes: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, f, generator=g, dtype=dtype)
    y = torch.randint(classes, (m,), generator=g)

    def split(a: int, b: int) -> Split:
        return Split((x[a:b],), y[a:b])

    return DataBundle(
        "toy",
        "classification",
        "vector",
        split(0, m - 12),
        split(m - 12, m - 6),
        split(m - 6, m),
        out_features=classes,
        in_features=f,
    )


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 25])
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_full_batch_gradient_is_the_whole_set_gradient(chunk_size: int | None, l2: float) -> None:
    data = _bundle(dtype=torch.float64)
    model = _model(dtype=torch.float64)
    sampler = FullBatch(len(data.train), chunk_size)
    loss, _ = accumulate_gradient(model, cross_entropy, data.train, sampler.next_step(), l2=l2)
    ours = [p.grad.clone() for p in model.parameters()]
    # reference: autograd of the mean loss over the whole set in one piece
    x, y = data.train.inputs[0], data.train.targets
    reference_loss = torch.nn.functional.cross_entropy(model(x), y) + l2 / 2 * sum(
        (p**2).sum() for p in model.parameters()
    )
    reference = torch.autograd.grad(reference_loss, list(model.parameters()))
    assert float(loss) == pytest.approx(float(reference_loss.detach()), rel=1e-12)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_accumulated_minibatches_give_the_mean_gradient_of_all_their_examples() -> None:
    data = _bundle(dtype=torch.float64)
    model = _model(dtype=torch.float64)
    sampler = Minibatch(len(data.train), 4, seed=3, accumulation=3)
    batches = sampler.next_step()
    accumulate_gradient(
        model, mse, Split((data.train.inputs[0],), torch.randn(len(data.train), 3, dtype=torch.float64)), batches
    )
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    # the same examples in one batch: mse is a mean, so the gradient must agree
    targets = torch.randn(len(data.train), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    split = Split((data.train.inputs[0],), targets)
    model.zero_grad()
    accumulate_gradient(model, mse, split, batches)
    ours = [p.grad.clone() for p in model.parameters()]
    idx = torch.cat(batches)
    reference = torch.autograd.grad(mse(model(split.inputs[0][idx]), targets[idx]), list(model.parameters()))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_minibatch_epoch_visits_each_example_once_and_reshuffles() -> None:
    sampler = Minibatch(10, 3, seed=0)
    epoch1 = torch.cat([sampler.next_step()[0] for _ in range(4)])
    epoch2 = torch.cat([sampler.next_step()[0] for _ in range(4)])
    assert sorted(epoch1.tolist()) == list(range(10)) == sorted(epoch2.tolist())
    assert not torch.equal(epoch1, epoch2)
    assert sampler.steps_per_epoch == 4 and sampler.epoch == 2.0


def test_batch_size_one_and_replacement() -> None:
    sampler = Minibatch(5, 1, seed=0)
    assert sorted(int(sampler.next_step()[0]) for _ in range(5)) == [0, 1, 2, 3, 4]
    with_replacement = Minibatch(5, 4, seed=0, replacement=True)
    draws = torch.cat([with_replacement.next_step()[0] for _ in range(50)])
    assert draws.min() >= 0 and draws.max() <= 4
    assert any(len(set(with_replacement.next_step()[0].tolist())) < 4 for _ in range(50))  # repeats happen


def test_gd_step_is_w_minus_lr_times_the_full_gradient() -> None:
    data = _bundle(dtype=torch.float64)
    model = _model(dtype=torch.float64)
    w0 = [p.detach().clone() for p in model.parameters()]
    x, y = data.train.inputs[0], data.train.targets
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        data,
        TrainConfig(steps=1, batch_size=None, chunk_size=10, progress=False),
    )
    trainer.fit()
    for p, w, g in zip(model.parameters(), w0, grads):
        torch.testing.assert_close(p.detach(), w - 0.5 * g, rtol=1e-12, atol=1e-14)


def test_l2_penalty_value_and_gradient() -> None:
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    penalty = l2_penalty([w], 0.1)
    assert float(penalty.detach()) == pytest.approx(0.05 * 14)
    penalty.backward()
    torch.testing.assert_close(w.grad, 0.1 * w.detach())


def test_schedules_closed_forms() -> None:
    s = Schedule("cosine", total_steps=110, warmup_steps=10, min_factor=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1)
    assert Schedule("step", 100, step_size=10, gamma=0.5)(25) == pytest.approx(0.25)
    assert Schedule("linear", 100)(50) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        Schedule("exp", 10)


def test_trainer_applies_schedule_and_accepts_torch_schedulers() -> None:
    data = _bundle()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(model, opt, data, TrainConfig(steps=4, schedule="linear", log_every=1, progress=False))
    trainer.fit()
    assert [r["lr"] for r in trainer.history] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    trainer = Trainer(model, opt, data, TrainConfig(steps=4, log_every=1, progress=False), scheduler=sched)
    trainer.fit()
    assert [r["lr"] for r in trainer.history] == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_clipping_bounds_the_applied_gradient() -> None:
    data = _bundle(dtype=torch.float64)
    model = _model(dtype=torch.float64)
    w0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        data,
        TrainConfig(steps=1, batch_size=None, clip_grad_norm=1e-3, log_every=1, progress=False),
    )
    trainer.fit()
    moved = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - w0
    # torch's clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-4)
    assert trainer.history[0]["grad_norm"] > 1e-3  # reported before clipping
    assert trainer.history[0]["update_norm"] == pytest.approx(float(moved.norm()), rel=1e-6)


def _run(out, steps: int, stop: int | None = None, resume: bool = False, flat: bool = False) -> Trainer:
    data = _bundle(m=80)
    model = _model(seed=1)
    if flat:  # descend's flat storage: parameters, gradients and state are views of one buffer each
        opt = optim.Adam(model.parameters(), lr=0.01, engine="foreach", flat=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    config = TrainConfig(
        steps=steps, batch_size=7, schedule="cosine", warmup_steps=3, eval_every=2, progress=False, tensorboard=False
    )
    trainer = Trainer(nn.Sequential(nn.Dropout(0.2), model), opt, data, config, out_dir=out)
    if resume:
        trainer.resume()
    trainer.fit(max_steps=stop)
    return trainer


@pytest.mark.parametrize("flat", [False, True])
def test_resume_is_bit_identical(tmp_path, flat: bool) -> None:
    full = _run(tmp_path / "full", 10, flat=flat)
    _run(tmp_path / "split", 10, stop=5, flat=flat)
    resumed = _run(tmp_path / "split", 10, resume=True, flat=flat)
    assert resumed.step == 10
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in full.history]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path) -> None:
    data = _bundle()
    model = _model()
    calls = []

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = cross_entropy(outputs, targets)
        return loss * math.inf if len(calls) == 4 else loss

    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        data,
        TrainConfig(steps=50, batch_size=None, eval_every=100, checkpoint_every=1, progress=False, tensorboard=False),
        loss_fn=loss_fn,
        out_dir=tmp_path,
    )
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        trainer.fit()
    good = trainer.last_checkpoint
    assert good is not None and good.name == "step-00000003" and (good / "model.safetensors").is_file()
    assert trainer.step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was never applied
    assert (tmp_path / "metrics.csv").is_file()


def test_early_stopping_and_metric_files(tmp_path) -> None:
    data = _bundle()
    model = _model()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=1e-12),
        data,
        TrainConfig(steps=100, eval_every=1, log_every=1, patience=3, progress=False, tensorboard=False),
        out_dir=tmp_path,
    )
    summary = trainer.fit()
    assert summary["stopped_early"] and summary["steps"] < 10
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary["steps"]
    assert {"loss", "accuracy", "grad_norm", "update_norm", "weight_norm", "val_loss", "val_accuracy"} <= set(rows[0])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "epoch", "seconds"]
    # accuracy on the validation split, recomputed by hand
    x, y = data.val.inputs[0], data.val.targets
    assert summary["val"]["accuracy"] == pytest.approx(float((model(x).argmax(-1) == y).float().mean()))


def test_seeded_runs_are_reproducible() -> None:
    def run() -> torch.Tensor:
        model = _model(seed=4)
        Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            _bundle(),
            TrainConfig(steps=7, batch_size=5, seed=9, progress=False),
        ).fit()
        return torch.nn.utils.parameters_to_vector(model.parameters())

    assert torch.equal(run(), run())


def test_constraint_metrics_for_decoupled_sign_methods() -> None:
    from descend import optim

    data = _bundle()
    model = _model()
    opt = optim.Signum(model.parameters(), lr=0.01, weight_decay=2.0)
    trainer = Trainer(model, opt, data, TrainConfig(steps=3, log_every=1, progress=False))
    trainer.fit()
    row = trainer.history[-1]
    assert row["radius"] == pytest.approx(0.5)
    w_max = max(float(p.detach().abs().max()) for p in model.parameters())
    assert row["max_abs_weight"] == pytest.approx(w_max)


def test_bf16_autocast_trains() -> None:
    model = _model()
    summary = Trainer(
        model, torch.optim.Adam(model.parameters(), 1e-2), _bundle(), TrainConfig(steps=5, bf16=True, progress=False)
    ).fit()
    assert math.isfinite(summary["train"]["loss"])
