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


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: optim.Adam(ps),
        lambda ps: optim.Lion(ps, flat=True),
    ],
    ids=["torch", "descend", "descend-flat"],
)
def test_clear_grads_matches_zero_grad_set_to_none(make) -> None:
    """The trainer's gradient reset leaves every parameter as ``zero_grad(set_to_none=True)`` does,
    and calls an optimizer's own ``zero_grad`` when it keeps gradients in flat buffers."""
    from descend.train._step import clear_grads

    results = []
    for reset in (clear_grads, lambda o: o.zero_grad(set_to_none=True)):
        model = _model()
        opt = make(list(model.parameters()))
        for _ in range(2):
            model(torch.ones(2, 5)).sum().backward()
            opt.step()
            reset(opt)
        results.append([p.grad if p.grad is None else p.grad.clone() for p in model.parameters()])
        flat = getattr(opt, "flat_layout", None) is not None
        if flat:  # a flat optimizer's gradients stay (zeroed) views of its buffer
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        else:
            assert all(p.grad is None for p in model.parameters())
    assert [g is None for g in results[0]] == [g is None for g in results[1]]


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
        TrainConfig(steps=1, batch_size=None, chunk_size=10, l2=0.0, progress=False),
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
        calls.extend([1] if model.training else [])  # training steps only, not evaluations
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
    trainer = Trainer(model, opt, data, TrainConfig(steps=3, log_every=1, restore_best=False, progress=False))
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


# ------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------


def test_device_names_resolve_and_unavailable_devices_are_one_line_errors() -> None:
    from descend.train._device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None)
    for bad in ("tpu", "gpu0", "cuda:x"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA") as info:
            Trainer(_model(), torch.optim.SGD(_model().parameters(), 0.1), _bundle(), TrainConfig(steps=1),
                    device="cuda:1")
        assert "\n" not in str(info.value)
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="no MPS"):
            resolve_device("mps")


def test_checkpoints_record_no_device_and_load_onto_the_trainers(tmp_path) -> None:
    """A checkpoint's tensors are read to the CPU and copied onto the trainer's device (``map_location``):
    here the saved copy is re-read as if it came from another device and must give the same run."""
    from safetensors import safe_open

    trainer = _run(tmp_path / "a", 6, stop=3)
    step_dir = trainer.last_checkpoint
    with safe_open(step_dir / "model.safetensors", "pt") as f:
        assert (f.metadata() or {}) == {} or "device" not in json.dumps(f.metadata())
    header = (step_dir / "model.safetensors").read_bytes()[8:2000].decode("utf-8", "ignore")
    assert "cuda" not in header and "cpu" not in header
    resumed = _run(tmp_path / "a", 6, resume=True)
    assert all(p.device == resumed.device for p in resumed.model.parameters())
    assert all(v.device == resumed.device for s in resumed.optimizer.state.values() for v in s.values() if v.dim())
    full = _run(tmp_path / "b", 6)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Datasets and DataLoaders
# ------------------------------------------------------------------------------------------------


class _Pairs(torch.utils.data.Dataset):
    """A map-style dataset over a Split: item i is ``(x_i, y_i)`` (what users write)."""

    def __init__(self, split: Split) -> None:
        self.x, self.y = split.inputs[0], split.targets

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


@pytest.mark.parametrize("batch_size", [None, 6])
def test_a_map_style_dataset_trains_like_the_same_tensors(batch_size: int | None) -> None:
    data = _bundle(m=50)
    runs = []
    for splits in (data, {name: _Pairs(getattr(data, name)) for name in ("train", "val", "test")}):
        model = _model(seed=2)
        config = TrainConfig(steps=9, batch_size=batch_size, accumulation=2, chunk_size=7, eval_every=3,
                             log_every=1, progress=False)
        summary = Trainer(model, torch.optim.Adam(model.parameters(), 0.01), splits, config).fit()
        runs.append((model, summary))
    (a, sa), (b, sb) = runs  # the same examples in the same order; slices of a tensor vs collated copies
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert sa["test"] == pytest.approx(sb["test"], rel=1e-6) and set(sb["test"]) == {"loss", "accuracy"}


def test_a_dataloaders_batches_are_the_steps() -> None:
    data = _bundle(m=60)
    dataset = torch.utils.data.TensorDataset(data.train.inputs[0], data.train.targets)
    loader = torch.utils.data.DataLoader(dataset, batch_size=7, shuffle=False)
    model, reference = _model(seed=3), _model(seed=3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), 0.3), {"train": loader, "val": data.val},
                      TrainConfig(epochs=2, accumulation=2, l2=0.0, restore_best=False, progress=False))
    assert trainer.total_steps == 2 * math.ceil(len(loader) / 2)  # a step never spans two epochs
    summary = trainer.fit()
    opt = torch.optim.SGD(reference.parameters(), 0.3)
    for _ in range(2):  # reference: pairs of batches, the last one alone, as one mean-loss step each
        batches = list(loader)
        for k in range(0, len(batches), 2):
            x = torch.cat([b[0] for b in batches[k : k + 2]])
            y = torch.cat([b[1] for b in batches[k : k + 2]])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert summary["epochs"] == 2.0 and "test" not in summary


def test_a_dataloader_run_resumes_exactly(tmp_path) -> None:
    data = _bundle(m=60)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.train.inputs[0], data.train.targets),
                                         batch_size=8)

    def run(out, stop: int | None = None, resume: bool = False) -> nn.Module:
        model = _model(seed=5)
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), 0.01), {"train": loader, "val": data.val},
                          TrainConfig(steps=13, progress=False, tensorboard=False, checkpoint_every=2), out_dir=out)
        if resume:
            assert trainer.resume() == 10
        trainer.fit(max_steps=stop)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "split", stop=10)  # mid-epoch: 8 batches per epoch
    resumed = run(tmp_path / "split", resume=True)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_the_task_is_inferred_from_a_datasets_targets() -> None:
    data = _bundle()
    x = data.train.inputs[0]
    as_regression = torch.utils.data.TensorDataset(x, torch.randn(len(x), 3))
    model = _model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), 0.1), as_regression,
                      TrainConfig(steps=2, progress=False))
    assert trainer.task == "regression" and set(trainer.fit()["train"]) == {"loss", "rmse", "r2"}
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), 0.1), _Pairs(data.train), TrainConfig(steps=1))
    assert trainer.task == "classification"
    with pytest.raises(TypeError, match="Split, a map-style torch Dataset"):
        Trainer(model, torch.optim.SGD(model.parameters(), 0.1), [1, 2, 3], TrainConfig(steps=1))


# ------------------------------------------------------------------------------------------------
# Metrics and callbacks
# ------------------------------------------------------------------------------------------------


def _regression(m: int = 40, std: float | None = None) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, 5, generator=g)
    y = x[:, :3] * 2 + 0.3 * torch.randn(m, 3, generator=g)
    bundle = DataBundle("toy", "regression", "vector", Split((x[:30],), y[:30]), Split((x[30:],), y[30:]),
                        Split((x[30:],), y[30:]), out_features=3, in_features=5)
    if std is not None:  # how the loaders record a standardised target's scale
        bundle.info["target_std"] = [std, 2 * std, 3 * std]
    return bundle


def test_regression_metrics_are_rmse_in_original_units_and_r2() -> None:
    model = _model()
    for std in (None, 10.0):
        data = _regression(std=std)
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), 0.0), data, TrainConfig(steps=1))
        got = trainer.evaluate("val", chunk_size=3)  # uneven chunks: the sums must still be exact
        x, y = data.val.inputs[0], data.val.targets
        with torch.no_grad():
            # the same float32 forward passes as the evaluation's chunks (a matmul's rounding depends on its size)
            err = torch.cat([model(chunk) for chunk in x.split(3)]).double() - y.double()
        scale = torch.tensor(data.info.get("target_std", [1.0, 1.0, 1.0]), dtype=torch.float64)
        assert got["rmse"] == pytest.approx(float((err * scale).square().mean().sqrt()), rel=1e-9)
        sst = (y.double() - y.double().mean(0)).square().sum(0)
        assert got["r2"] == pytest.approx(float((1 - err.square().sum(0) / sst).mean()), rel=1e-9)
        assert got["loss"] == pytest.approx(float(err.square().mean()), rel=1e-6)


def test_user_metrics_per_example_or_scalar_are_means_over_the_split() -> None:
    data = _bundle(m=50)
    model = _model()
    metrics = {
        "margin": lambda out, y: out.gather(1, y[:, None])[:, 0] - out.logsumexp(1),  # per example
        "mean_logit": lambda out, y: out.mean(),  # a scalar: the chunk's mean
    }
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), 0.0), data, TrainConfig(steps=1), metrics=metrics)
    got = trainer.evaluate("train", chunk_size=4)
    with torch.no_grad():
        out = model(data.train.inputs[0])
    y = data.train.targets
    assert got["margin"] == pytest.approx(float((out.gather(1, y[:, None])[:, 0] - out.logsumexp(1)).mean()), rel=1e-6)
    assert got["mean_logit"] == pytest.approx(float(out.mean()), rel=1e-6)


def test_callbacks_see_every_step_validation_and_the_end() -> None:
    events: list[tuple[str, int]] = []

    class Recorder:
        def on_step_end(self, trainer: Trainer, row: dict) -> None:
            events.append(("step", trainer.step))
            if trainer.step == 7:
                trainer.should_stop = True

        def on_validation_end(self, trainer: Trainer, metrics: dict) -> None:
            assert "val_loss" in metrics
            events.append(("val", trainer.step))

        def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
            events.append(("end", summary["steps"]))

    model = _model()
    Trainer(model, torch.optim.SGD(model.parameters(), 0.1), _bundle(), TrainConfig(steps=20, eval_every=3),
            callbacks=[Recorder()]).fit()
    assert [s for e, s in events if e == "step"] == list(range(1, 8))
    assert [s for e, s in events if e == "val"] == [3, 6]
    assert events[-1] == ("end", 7)
    with pytest.raises(TypeError, match="on_step_end"):
        Trainer(model, torch.optim.SGD(model.parameters(), 0.1), _bundle(), TrainConfig(steps=1), callbacks=[object()])


# ------------------------------------------------------------------------------------------------
# Honest outcomes: early stopping, divergence
# ------------------------------------------------------------------------------------------------


def _learnable(m: int = 90) -> DataBundle:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, 5, generator=g)
    y = (x @ torch.randn(5, 3, generator=g)).argmax(1)
    return DataBundle("toy", "classification", "vector", Split((x[:60],), y[:60]), Split((x[60:75],), y[60:75]),
                      Split((x[75:],), y[75:]), out_features=3, in_features=5)


def test_early_stopping_says_why_restores_the_best_weights_and_keeps_best(tmp_path, capsys) -> None:
    kept: dict[int, list[torch.Tensor]] = {}

    class Sabotage:  # after step 3 every step adds noise, so the validation loss stops improving
        def on_step_end(self, trainer: Trainer, row: dict) -> None:
            if trainer.step > 3:
                with torch.no_grad():
                    for p in trainer.model.parameters():
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(trainer.step)) * 0.5)

        def on_validation_end(self, trainer: Trainer, metrics: dict) -> None:
            kept[trainer.step] = [p.detach().clone() for p in trainer.model.parameters()]

    model = _model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), 0.5), _learnable(),
                      TrainConfig(steps=200, batch_size=None, eval_every=1, patience=2, tensorboard=False),
                      callbacks=[Sabotage()], out_dir=tmp_path)
    summary = trainer.fit()
    assert summary["stopped_early"] and summary["steps"] < 200
    best = summary["best_step"]
    losses = {r["step"]: r["val_loss"] for r in trainer.history}
    assert best == min(losses, key=losses.get)
    for p, q in zip(model.parameters(), kept[best]):
        assert torch.equal(p, q)  # the best weights are back
    assert summary["val"]["loss"] == pytest.approx(losses[best], rel=1e-6)
    out = capsys.readouterr().out
    assert f"early stopping at step {summary['steps']}" in out and "restored the best weights" in out
    assert f"best {losses[best]:.4g} at step {best}" in out
    assert json.loads((tmp_path / "best" / "latest.json").read_text())["step"] == best
    # a new process resuming the stopped run gets the best weights back from best/
    again = _model(seed=7)
    resumed = Trainer(again, torch.optim.SGD(again.parameters(), 0.5), _learnable(),
                      TrainConfig(steps=200, batch_size=None, eval_every=1, patience=2, progress=False,
                                  tensorboard=False), out_dir=tmp_path)
    resumed.resume()
    resumed.fit()
    for p, q in zip(again.parameters(), kept[best]):
        assert torch.equal(p, q)


def test_a_blown_up_validation_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, capsys) -> None:
    data = _regression()
    model = nn.Linear(5, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), 3.0), data,
                      TrainConfig(steps=100, batch_size=None, eval_every=1, progress=False, tensorboard=False),
                      out_dir=tmp_path)
    summary = trainer.fit()  # lr 3 on this least squares problem: the loss grows geometrically, finite for a while
    assert summary["diverged"] and summary["steps"] < 100
    start = summary["val_loss_start"]
    rows = {r["step"]: r["val_loss"] for r in trainer.history}
    assert rows[summary["steps"]] > 100 * start >= max(v for s, v in rows.items() if s < summary["steps"])
    assert json.loads((tmp_path / "checkpoint" / "latest.json").read_text())["step"] == summary["steps"] - 1
    err = capsys.readouterr().err
    assert err.startswith("descend: warning: the validation loss rose from") and "diverged" in err
    assert err.count("\n") == 1


def _noise(m: int = 40) -> DataBundle:
    """Targets unrelated to the inputs: a model can only memorise its 8 training rows (overfit)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(m, 5, generator=g), torch.randn(m, 1, generator=g)
    return DataBundle("noise", "regression", "vector", Split((x[:8],), y[:8]), Split((x[8:24],), y[8:24]),
                      Split((x[24:],), y[24:]), out_features=1, in_features=5)


@pytest.mark.parametrize("restore_best", [True, False])
def test_overfitting_is_not_divergence_and_the_best_weights_are_kept(capsys, restore_best: bool) -> None:
    data = _noise()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), 0.01), data,
                      TrainConfig(steps=300, batch_size=None, eval_every=10, l2=0.0, restore_best=restore_best,
                                  progress=False))
    train_start = trainer.evaluate("train")["loss"]
    summary = trainer.fit()
    val = {r["step"]: r["val_loss"] for r in trainer.history if "val_loss" in r}
    # the training loss fell while the validation loss rose above where it started: overfitting
    train_end = trainer.history[-1]["loss"]  # full batch: the training loss of the last step's weights
    assert train_end < 0.1 * train_start and val[300] > summary["val_loss_start"]
    assert summary["diverged"] is False and summary["steps"] == 300 and "stop_reason" not in summary
    assert "diverged" not in capsys.readouterr().err
    best = min(val, key=val.get)
    assert summary["best_step"] == best < 300 and summary["best_val_loss"] == pytest.approx(val[best])
    kept = best if restore_best else 300
    assert summary["weights_step"] == kept
    assert summary["val"]["loss"] == pytest.approx(val[kept], rel=1e-6)  # the model ends with those weights
