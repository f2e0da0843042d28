"""Lean training modes in the trainer and the CLI: the step inside the backward pass, and bfloat16 and 8-bit
optimizer state."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from descend import optim
from descend.data._base import DataBundle, Split
from descend.runs import RunSpec, prepare
from descend.train import NonFiniteLossError, TrainConfig, Trainer


def _bundle(m: int = 120) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
    return DataBundle("toy", "classification", "vector", Split((x[:80],), y[:80]), Split((x[80:100],), y[80:100]),
                      Split((x[100:],), y[100:]), out_features=3, in_features=6)


def _trainer(out=None, data=None, **config) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = TrainConfig(steps=12, batch_size=16, progress=False, log_every=1, checkpoint_every=4, **config)
    return Trainer(model, opt, data or _bundle(), cfg, out_dir=out)


@pytest.mark.parametrize("l2", [0.0, 0.01])
def test_the_trainer_steps_in_backward_as_it_steps_after_it(l2: float) -> None:
    ordinary, inside = _trainer(l2=l2), _trainer(step_in_backward=True, l2=l2)
    ordinary.fit()
    inside.fit()
    for a, b in zip(ordinary.model.parameters(), inside.model.parameters()):
        assert torch.equal(a, b)
    assert ordinary.summary()["train"] == inside.summary()["train"]
    assert all(p.grad is None for p in inside.model.parameters())
    inside_row = inside.train_step(measure=True)  # after fit the hooks are gone: an ordinary step again
    assert "grad_norm" in inside_row


def test_a_step_in_backward_logs_its_update_and_resumes_bit_for_bit(tmp_path) -> None:
    whole = _trainer(tmp_path / "whole", step_in_backward=True)
    whole.fit()
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["update_norm"] > 0 and "grad_norm" not in r for r in rows if "update_norm" in r)
    first = _trainer(tmp_path / "split", step_in_backward=True)
    first.fit(max_steps=8)
    second = _trainer(tmp_path / "split", step_in_backward=True)
    assert second.resume() == 8
    second.fit()
    for a, b in zip(whole.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_a_non_finite_loss_stops_before_the_backward_pass_moves_anything() -> None:
    data = _bundle()
    data.train.inputs[0][:] = float("nan")
    trainer = _trainer(data=data, step_in_backward=True)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteLossError, match="the loss became nan at step 1"):
        trainer.fit()
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))


@pytest.mark.parametrize("config,message", [
    ({"clip_grad_norm": 1.0}, "drop clip_grad_norm"),
    ({"accumulation": 2}, "one micro-batch per step"),
])
def test_what_needs_every_gradient_is_refused(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _trainer(step_in_backward=True, **config)


@pytest.mark.parametrize("state_dtype,dtype", [("bfloat16", torch.bfloat16), ("int8", torch.uint8)])
def test_low_precision_state_from_the_options(state_dtype: str, dtype: torch.dtype) -> None:
    trainer = prepare(RunSpec(optimizer="adamw", state_dtype=state_dtype, steps=2, width=8, progress=False))
    trainer.fit()
    states = [s for s in trainer.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == dtype and s["exp_avg_sq"].dtype == dtype for s in states)


def test_int8_state_trains_and_resumes_bit_for_bit_through_the_cli(tmp_path) -> None:
    def descend(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "descend", *args], capture_output=True, text=True, timeout=300)

    from safetensors.torch import load_file

    opts = ["--batch-size", "16", "--width", "16", "--threads", "1", "--optimizer", "adamw", "--no-progress",
            "--state-dtype", "int8"]
    full = descend("train", *opts, "--steps", "8", "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    assert descend("train", *opts, "--steps", "4", "--out", str(tmp_path / "part")).returncode == 0
    resumed = descend("train", "--resume", str(tmp_path / "part"), "--steps", "8")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "full" / "config.json").read_text())["state_dtype"] == "int8"
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_records_both_modes_and_refuses_a_clash(tmp_path) -> None:
    def descend(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "descend", *args], capture_output=True, text=True, timeout=300)

    ok = descend("train", "--steps", "3", "--width", "8", "--threads", "1", "--no-progress", "--step-in-backward",
                 "--state-dtype", "bfloat16", "--optimizer", "lion", "--out", str(tmp_path / "lean"))
    assert ok.returncode == 0, ok.stderr
    config = json.loads((tmp_path / "lean" / "config.json").read_text())
    assert config["step_in_backward"] is True and config["state_dtype"] == "bfloat16"
    clash = descend("train", "--steps", "3", "--step-in-backward", "--clip-grad-norm", "1", "--out", str(tmp_path))
    assert clash.returncode == 2 and "step_in_backward: clipping" in clash.stderr
    assert clash.stderr.count("\n") == 1
    sharded = descend("train", "--steps", "3", "--strategy", "fsdp", "--state-dtype", "int8", "--out", str(tmp_path))
    assert sharded.returncode == 2 and "--state-dtype int8" in sharded.stderr and "FSDP" in sharded.stderr
    assert sharded.stderr.count("\n") == 1


@pytest.mark.parametrize("optimizer,state_dtype,per_parameter", [
    ("adamw", "float32", 8), ("adamw", "bfloat16", 4), ("lion", "float32", 4), ("lion", "bfloat16", 2),
    ("adamw", "int8", 2 * (1 + 4 / 256)), ("lion", "int8", 1 + 4 / 256),
    ("momentum", "float32", 4), ("sgd", "float32", 0), ("gd", "float32", 0), ("signsgd", "float32", 0),
])
def test_optimizer_state_bytes_are_counted_from_the_optimizer(optimizer: str, state_dtype: str,
                                                              per_parameter: int) -> None:
    from descend.train import state_bytes_per_parameter

    extra = {"state_dtype": state_dtype} if state_dtype != "float32" else {}
    assert state_bytes_per_parameter(optimizer, **extra) == per_parameter


def test_the_memory_plan_follows_the_modes_and_matches_a_real_run() -> None:
    from descend.data.registry import load_data
    from descend.train import memory_plan

    data = load_data("digits")
    plain = memory_plan(RunSpec(optimizer="adamw", steps=1, width=256, depth=8), data)
    lean = memory_plan(RunSpec(optimizer="adamw", steps=1, width=256, depth=8, step_in_backward=True,
                               state_dtype="bfloat16"), data)
    trainer = prepare(RunSpec(optimizer="adamw", steps=1, width=256, depth=8, progress=False))
    n = sum(p.numel() for p in trainer.model.parameters())
    assert plain.parameters == n and plain.bytes_per_parameter == 16  # 4 weights + 4 gradients + 8 state
    assert lean.gradients < plain.gradients / 2 and lean.optimizer_state == plain.optimizer_state // 2
    assert lean.bytes_per_parameter < 10
    eight = memory_plan(RunSpec(optimizer="adamw", steps=1, width=256, depth=8, state_dtype="int8"), data)
    assert eight.optimizer_state == int(n * 2 * (1 + 4 / 256))  # codes and a float32 scale per 256 values
    assert "memory plan:" in plain.describe(10**10) and "optimizer state" in plain.describe()


def test_a_run_that_does_not_fit_is_refused_before_allocation(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "descend", "train", "--model", "resmlp", "--width", "65536",
                             "--depth", "1024", "--steps", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "choose a smaller" in result.stderr and result.stderr.count("\n") == 1


# -- bfloat16 parameters (--param-dtype bfloat16) ---------------------------------------------------------------
def _bf16_trainer(out=None, **config) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = optim.Lion(model.parameters(), lr=1e-3, weight_decay=0.1, state_dtype=torch.bfloat16)
    cfg = TrainConfig(steps=12, batch_size=16, progress=False, log_every=1, checkpoint_every=4,
                      param_dtype="bfloat16", **config)
    return Trainer(model, opt, _bundle(), cfg, out_dir=out)


@pytest.mark.parametrize("in_backward", [False, True])
def test_bfloat16_parameters_train_without_a_float32_copy_and_resume_bit_for_bit(tmp_path, in_backward) -> None:
    whole = _bf16_trainer(tmp_path / "whole", step_in_backward=in_backward)
    before = [p.detach().clone() for p in whole.model.parameters()]
    whole.fit()
    params = list(whole.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in whole.optimizer.state.values())
    assert any(not torch.equal(p, q) for p, q in zip(params, before))
    first = _bf16_trainer(tmp_path / "split", step_in_backward=in_backward)
    first.fit(max_steps=8)
    second = _bf16_trainer(tmp_path / "split", step_in_backward=in_backward)
    assert second.resume() == 8
    second.fit()
    for a, b in zip(params, second.model.parameters()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)


def test_bfloat16_parameters_with_float32_state_from_the_options() -> None:
    """--param-dtype bfloat16 --state-dtype float32: the state stays float32 (not the parameters' dtype)."""
    trainer = prepare(RunSpec(optimizer="adamw", param_dtype="bfloat16", steps=2, width=8, progress=False))
    trainer.fit()
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in trainer.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())


def test_the_memory_plan_counts_bfloat16_parameters_and_gradients_at_two_bytes() -> None:
    from descend.data.registry import load_data
    from descend.train import memory_plan

    data = load_data("digits")
    plain = memory_plan(RunSpec(optimizer="lion", steps=1, width=256, depth=8), data)
    half = memory_plan(RunSpec(optimizer="lion", steps=1, width=256, depth=8, param_dtype="bfloat16",
                               state_dtype="bfloat16"), data)
    assert plain.bytes_per_parameter == 4 + 4 + 4 and half.bytes_per_parameter == 2 + 2 + 2
    assert half.weights == plain.weights // 2 and half.gradients == plain.gradients // 2


def test_a_run_with_bfloat16_parameters_survives_kill_9_and_predicts(tmp_path) -> None:
    """kill -9 mid-run, resume to step N: the weights are those of an uninterrupted N-step run, bit for bit;
    `descend predict` loads the bfloat16 weights."""
    from safetensors.torch import load_file

    common = ["--width", "8", "--threads", "1", "--no-progress", "--param-dtype", "bfloat16", "--optimizer", "lion",
              "--state-dtype", "bfloat16", "--checkpoint-every", "20", "--eval-every", "20", "--log-every", "20",
              "--no-restore-best"]
    killed = tmp_path / "killed"
    first = subprocess.Popen([sys.executable, "-m", "descend", "train", "--steps", "100000", *common, "--out",
                              str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoint" / "latest.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    reached = json.loads((killed / "checkpoint" / "latest.json").read_text())["step"]

    def descend(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "descend", *args], capture_output=True, text=True, timeout=300)

    resumed = descend("train", "--resume", str(killed), "--steps", str(reached + 7))
    assert resumed.returncode == 0, resumed.stderr
    straight = descend("train", "--steps", str(reached + 7), *common, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    a, b = load_file(killed / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / "config.json").read_text())["param_dtype"] == "bfloat16"
    from descend.runs._predict import load_run_model  # what `descend predict` and `descend generate` load

    model, _ = load_run_model(killed, device="cpu")
    assert all(torch.equal(t, a[k].to(t.dtype)) for k, t in model.state_dict().items())
    features = next(t for t in model.state_dict().values() if t.dim() == 2).shape[1]  # the first layer's inputs
    assert bool(torch.isfinite(model(torch.zeros(2, features))).all())


def test_a_bfloat16_language_model_trains_in_backward_and_generates(tmp_path) -> None:
    """--param-dtype bfloat16 with bfloat16 state and the step in the backward pass (the leanest mode) on a
    transformer; `descend generate` samples from its bfloat16 weights, seeded."""
    from descend.cli import main
    from descend.runs._generate import generate_text

    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 200, encoding="utf-8")
    run = tmp_path / "lm"
    assert main(["train", "--data", str(text), "--model", "transformer", "--width", "16", "--depth", "1", "--steps",
                 "4", "--batch-size", "4", "--threads", "1", "--param-dtype", "bfloat16", "--state-dtype", "bfloat16",
                 "--optimizer", "lion", "--step-in-backward", "--no-progress", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["param_dtype"] == "bfloat16" and config["step_in_backward"] is True
    first = "".join(generate_text(run, "the ", 10, seed=1, device="cpu").pieces)
    assert first and "".join(generate_text(run, "the ", 10, seed=1, device="cpu").pieces) == first
