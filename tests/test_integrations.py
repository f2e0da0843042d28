"""descend's optimizers inside the tools people train with: torch.compile, Lightning, Hugging Face Trainer.

Slow (real training loops). Lightning and transformers come with the optional extra
(``pip install -e ".[integrations]"``, which ``make test-slow`` installs); without it those tests skip.
Where torch has the same optimizer, descend's result is compared with torch.optim's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from descend import optim

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model built from a config: nothing to download

pytestmark = pytest.mark.slow


def assert_close(out: list[torch.Tensor], ref: list[torch.Tensor], rtol: float) -> None:
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-2)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def _data(n: int = 64) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    return torch.utils.data.TensorDataset(x, x[:, :1] * 0.5 - x[:, 1:2] ** 2)


# -- torch.compile(opt.step) ------------------------------------------------------------------------
COMPILED = {
    "adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd": lambda p: optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    "lion": lambda p: optim.Lion(p, lr=1e-3, weight_decay=0.1),
    "signum": lambda p: optim.Signum(p, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0),
}


def _compiled_run(make: Any, compiled: bool, steps: int, warmup: int,
                  strict: bool = True) -> tuple[list[torch.Tensor], int]:
    """``steps`` steps under OneCycleLR (which cycles lr and momentum or beta1); returns the weights and
    the graphs dynamo compiled after ``warmup`` steps, where any recompile raises if ``strict``."""
    model = _mlp()
    opt = make(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=steps + 1)
    step = torch.compile(opt.step) if compiled else opt.step
    x, y = _data().tensors
    graphs = 0
    for t in range(steps):
        if t == warmup:
            graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=strict and t >= warmup):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()], counters["stats"]["unique_graphs"] - graphs


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_compiled_step_does_not_recompile_under_a_schedule_and_matches_eager(name: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    compiled, new_graphs = _compiled_run(COMPILED[name], True, steps=20, warmup=3)
    assert new_graphs == 0
    eager, _ = _compiled_run(COMPILED[name], False, steps=20, warmup=3)
    assert_close(compiled, eager, rtol=1e-5)


def test_compiled_adamw_matches_torch_compiled_adamw() -> None:
    torch._dynamo.reset()
    ours, _ = _compiled_run(COMPILED["adamw"], True, steps=12, warmup=3)
    # torch's compiled AdamW recompiles whenever OneCycleLR changes beta1 (a float it specialises on)
    theirs, _ = _compiled_run(lambda p: torch.optim.AdamW(p, lr=torch.tensor(1e-2), weight_decay=0.1), True,
                              steps=12, warmup=3, strict=False)
    for a, b in zip(ours, theirs, strict=True):  # the same equations in another order: rounding apart
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- Lightning ------------------------------------------------------------------------------------
def _lightning_module(pl: Any, make: Any, schedule: bool) -> Any:
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()
            self.betas: list[float] = []  # the beta each step has used, where the optimizer has one

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            self.betas.append(self.trainer.optimizers[0].param_groups[0].get("beta"))
            return nn.functional.mse_loss(self.net(x), y)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(_data(), batch_size=16)

        def configure_optimizers(self) -> Any:
            opt = make(self.parameters())
            if not schedule:
                return opt
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=16)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Module()


def _fit(pl: Any, module: Any, tmp: Path, epochs: int, ckpt: Path | None = None, **kw: Any) -> Any:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp, **kw)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_with_gradient_clipping_matches_torch_adamw(precision: str, tmp_path: Path) -> None:
    """bf16-mixed with ``gradient_clip_val`` used to fail: the optimizer claimed to unscale gradients itself."""
    pl = pytest.importorskip("lightning.pytorch")
    weights = []
    for make in (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: optim.AdamW(p, lr=1e-2)):
        module = _lightning_module(pl, make, schedule=False)
        _fit(pl, module, tmp_path, epochs=3, precision=precision, gradient_clip_val=0.1)
        weights.append([p.detach() for p in module.parameters()])
    assert_close(weights[1], weights[0], rtol=1e-5)


def test_lightning_onecycle_cycles_signum_beta_and_resumes_identically(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    make = lambda p: optim.Signum(p, lr=1e-2, weight_decay=0.1)  # noqa: E731
    straight = _lightning_module(pl, make, schedule=True)
    _fit(pl, straight, tmp_path, epochs=4)
    assert len(set(straight.betas)) > 8 and max(straight.betas) <= 0.95  # OneCycleLR drove the ema's beta
    first = _lightning_module(pl, make, schedule=True)
    trainer = _fit(pl, first, tmp_path, epochs=2)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _lightning_module(pl, make, schedule=True)
    _fit(pl, resumed, tmp_path, epochs=4, ckpt=ckpt)
    assert_close([p.detach() for p in resumed.parameters()], [p.detach() for p in straight.parameters()], rtol=0)


# -- Hugging Face Trainer -------------------------------------------------------------------------
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 16) -> None:
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_train(transformers: Any, make: Any, out: Path, resume: Path | None = None) -> list[torch.Tensor]:
    """A 1-layer GPT-2 built from a config, 8 steps of bf16 autocast with clipping, checkpoints every 4."""
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    opt, sched = make(model.parameters())
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=4, max_grad_norm=0.5, bf16=True,
        use_cpu=True, report_to="none", save_strategy="steps", save_steps=4, logging_strategy="no", seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return [p.detach().clone() for p in model.parameters()]


def _with_schedule(opt: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, Any]:
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8)


def test_hf_trainer_bf16_with_clipping_matches_torch_adamw(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    theirs = _hf_train(transformers, lambda p: _with_schedule(torch.optim.AdamW(p, lr=1e-2)), tmp_path / "torch")
    ours = _hf_train(transformers, lambda p: _with_schedule(optim.AdamW(p, lr=1e-2)), tmp_path / "descend")
    assert_close(ours, theirs, rtol=1e-5)


def test_hf_trainer_resumes_signum_from_a_checkpoint_identically(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    make = lambda p: _with_schedule(optim.Signum(p, lr=1e-3, weight_decay=0.1))  # noqa: E731
    straight = _hf_train(transformers, make, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint-4" / "optimizer.pt").exists()
    resumed = _hf_train(transformers, make, tmp_path / "resumed", resume=tmp_path / "run" / "checkpoint-4")
    assert_close(resumed, straight, rtol=0)
