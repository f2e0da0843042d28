"""The trainer on CUDA: training, bf16, checkpoints that move between CUDA and CPU, NCCL data parallelism.

Skipped on machines without CUDA (the CPU suite covers the same code paths with device="cpu").
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from _distributed_helpers import max_abs_diff, run
from descend import distributed as dd
from descend import optim
from descend.data._base import DataBundle, Split
from descend.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

JOB = Path(__file__).parent / "distributed_scripts" / "trainer_job.py"


def _bundle() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g)
    y = (x @ torch.randn(5, 3, generator=g)).argmax(1)
    return DataBundle("toy", "classification", "vector", Split((x[:70],), y[:70]), Split((x[70:85],), y[70:85]),
                      Split((x[85:],), y[85:]), out_features=3, in_features=5)


def _trainer(device: str, out: Path | None = None, steps: int = 8, **config: object) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))  # no dropout: RNG streams differ by device
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    cfg = TrainConfig(steps=steps, batch_size=10, progress=False, tensorboard=False, checkpoint_every=2, **config)
    return Trainer(model, opt, _bundle(), cfg, device=device, out_dir=out)


def test_training_on_cuda_keeps_model_state_and_metrics_on_the_device() -> None:
    trainer = _trainer("cuda")
    summary = trainer.fit()
    assert trainer.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    assert all(v.device.type == "cuda" for s in trainer.optimizer.state.values() for v in s.values() if v.dim())
    assert math.isfinite(summary["test"]["loss"]) and 0 <= summary["test"]["accuracy"] <= 1
    cpu = _trainer("cpu").fit()
    assert summary["test"]["loss"] == pytest.approx(cpu["test"]["loss"], rel=1e-3)  # the same run, other kernels


def test_bf16_autocast_on_cuda_trains() -> None:
    summary = _trainer("cuda", steps=20, bf16=True).fit()
    assert math.isfinite(summary["train"]["loss"])


@pytest.mark.parametrize(("first", "second"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_the_other_device(tmp_path: Path, first: str, second: str) -> None:
    _trainer(first, tmp_path / "run").fit(max_steps=4)
    resumed = _trainer(second, tmp_path / "run")
    assert resumed.resume() == 4
    assert all(p.device.type == second for p in resumed.model.parameters())
    resumed.fit()
    reference = _trainer(first)
    reference.fit()
    for p, q in zip(resumed.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nccl_ranks_train_the_one_gpu_model(tmp_path: Path, strategy: str) -> None:
    code, log, _ = run([sys.executable, str(JOB), "--out", str(tmp_path / "one.pt")], timeout=300)
    assert code == 0, log[-3000:]
    code, log, _ = run(dd.torchrun_command(2, [str(JOB), "--strategy", strategy, "--out", str(tmp_path / "two.pt")]),
                       timeout=300)
    assert code == 0, log[-4000:]
    one, two = (torch.load(tmp_path / f, weights_only=False) for f in ("one.pt", "two.pt"))
    assert two["world"] == 2 and two["device"] == "cuda:0" and one["device"].startswith("cuda")
    assert max_abs_diff(two["weights"], one["weights"]) <= 1e-5


@pytest.mark.parametrize("name", ["Lion", "Signum", "SGD"])
def test_default_optimizers_on_cuda_match_the_reference_engine(name: str) -> None:
    """On CUDA ``auto`` takes torch's kernels, the compiled engine or foreach (the native loop is CPU-only)."""
    outs = []
    for engine in ("auto", "reference"):
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen, device="cuda")) for s in [(64, 32), (1000,)]]
        kw = {"momentum": 0.9, "lr": 0.01} if name == "SGD" else {}
        opt = getattr(optim, name)(params, engine=engine, **kw)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, device="cuda")
            opt.step()
        outs.append([p.detach().cpu() for p in params])
        if engine == "auto":
            assert "native" not in [r.kernel for r in opt.last_step_kernels]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_int8_state_on_cuda_equals_the_reference_engine_and_its_cpu_copy(name: str) -> None:
    """8-bit state on CUDA through the Python engines: uint8 codes on the device, and each engine's step that of
    the reference engine (torch's CUDA kernels may round a value of the state differently in the last bit,
    which can pick the neighbouring code: nearly every code and parameter equal)."""
    runs = {}
    for engine in ("reference", "foreach", "compiled", "auto"):
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen, device="cuda")) for s in [(64, 33), (1000,), ()]]
        opt = getattr(optim, name)(params, lr=1e-3, engine=engine, state_dtype="int8")
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, device="cuda")
            opt.step()
        state = opt.state[params[1]]
        assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].is_cuda
        assert state["exp_avg_scales"].shape == (4,)
        codes = torch.cat([s["exp_avg"].reshape(-1).cpu() for s in opt.state.values()])
        runs[engine] = ([p.detach().cpu() for p in params], codes)
    for engine, (params, codes) in runs.items():
        close = torch.cat([((a - b).abs() <= 1e-6).reshape(-1) for a, b in zip(params, runs["reference"][0])])
        assert close.float().mean() > 0.99 and (codes == runs["reference"][1]).float().mean() > 0.99, engine

def test_a_language_model_trains_and_samples_on_cuda_in_bf16(tmp_path: Path) -> None:
    """``descend train --device cuda --bf16`` on a text file, then ``descend generate`` on the same device."""
    from descend.cli import main
    from descend.runs._generate import generate_text

    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 400, encoding="utf-8")
    run = tmp_path / "lm"
    assert main(["train", "--data", str(text), "--model", "transformer", "--width", "32", "--depth", "1", "--steps",
                 "20", "--batch-size", "8", "--device", "cuda", "--bf16", "--no-progress", "--out", str(run)]) == 0
    cached = "".join(generate_text(run, "the ", 40, seed=1, device="cuda").pieces)
    assert len(cached) >= 1
    assert "".join(generate_text(run, "the ", 40, seed=1, device="cuda").pieces) == cached  # seeded on the GPU too
