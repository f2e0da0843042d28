"""Checkpoints: exact round trips without pickle, atomic replacement, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from descend.checkpoint._tensorfile import decode, encode
from descend.data._base import DataBundle, Split
from descend.train import CheckpointError, TrainConfig, Trainer, load_checkpoint, save_checkpoint


def test_encode_decode_round_trip_keeps_types_and_bits() -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3)}},
        "groups": [{"betas": (0.9, 0.99), "lr": 1e-3, "name": None}],
        "flag": True,
    }
    tensors: dict[str, torch.Tensor] = {}
    back = decode(json.loads(json.dumps(encode(state, tensors))), tensors)
    assert set(back["state"]) == {0} and back["groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(back["state"][0]["m"], state["state"][0]["m"])
    with pytest.raises(CheckpointError, match="cannot store"):
        encode({"f": object()}, {})


def test_save_keeps_the_newest_and_files_are_safetensors_and_json(tmp_path) -> None:
    model = {"w": torch.arange(6.0).reshape(2, 3)}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step, "rng": torch.get_rng_state()}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 3 and torch.equal(ckpt.model["w"], model["w"])
    names = ["manifest.json", "model.safetensors", "state.json", "state.safetensors"]
    assert sorted(p.name for p in ckpt.path.iterdir()) == names
    manifest = json.loads((ckpt.path / "manifest.json").read_text())
    assert manifest["format"] == 2 and sorted(manifest["files"]) == names[1:]


def test_corrupt_or_missing_checkpoints_are_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"x": torch.zeros(2)})
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its recorded SHA-256"):
        load_checkpoint(tmp_path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")


def _bundle() -> DataBundle:
    x, y = torch.randn(20, 4), torch.randint(2, (20,))
    s = Split((x,), y)
    return DataBundle("toy", "classification", "vector", s, s, s, out_features=2, in_features=4)


def test_mismatched_model_or_optimizer_is_refused(tmp_path) -> None:
    model = nn.Linear(4, 2)
    Trainer(
        model,
        torch.optim.SGD(model.parameters(), 0.1),
        _bundle(),
        TrainConfig(steps=2, progress=False, tensorboard=False),
        out_dir=tmp_path,
    ).fit()
    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="different model"):
        Trainer(
            other, torch.optim.SGD(other.parameters(), 0.1), _bundle(), TrainConfig(steps=2), out_dir=tmp_path
        ).resume()
    same = nn.Linear(4, 2)
    with pytest.raises(CheckpointError, match="optimizer SGD"):
        Trainer(same, torch.optim.Adam(same.parameters()), _bundle(), TrainConfig(steps=2), out_dir=tmp_path).resume()


def test_a_background_save_writes_the_state_as_it_was_when_submitted(tmp_path, monkeypatch) -> None:
    import threading

    from descend.checkpoint import _local

    release, write = threading.Event(), _local.save_checkpoint

    def held(*args, **kwargs):  # the write starts only after training has moved the tensors on
        release.wait(timeout=30)
        return write(*args, **kwargs)

    monkeypatch.setattr(_local, "save_checkpoint", held)
    weights, moment = torch.randn(64, 64), torch.randn(64, 64)
    want_w, want_m = weights.clone(), moment.clone()
    saver = _local.BackgroundSaver()
    saver.submit(tmp_path / "ckpt", 3, {"w": weights}, {"optimizer": {"m": moment}, "step": 3})
    weights.add_(1.0)
    moment.mul_(2.0)
    release.set()
    saver.wait()
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.step == 3
    assert torch.equal(ckpt.model["w"], want_w)
    assert torch.equal(ckpt.state["optimizer"]["m"], want_m)


def test_a_background_save_that_fails_raises_at_the_next_wait(tmp_path) -> None:
    from descend.checkpoint._local import BackgroundSaver

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the checkpoint root should be")
    saver = BackgroundSaver()
    saver.submit(blocker, 1, {"w": torch.zeros(2)}, {"step": 1})
    with pytest.raises(OSError):
        saver.wait()
    saver.wait()  # the error is raised once


def test_the_best_weights_are_saved_without_optimizer_state_and_restored_after_a_resume(tmp_path) -> None:
    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        config = TrainConfig(steps=8, batch_size=5, eval_every=2, restore_best=True, progress=False, tensorboard=False)
        return Trainer(model, torch.optim.SGD(model.parameters(), 0.5), _bundle(), config, out_dir=tmp_path)

    torch.manual_seed(1)
    first = trainer()
    first.fit(max_steps=4)
    best = load_checkpoint(tmp_path / "best")
    assert "optimizer" not in best.state and best.step == first.early_stopping.best_step
    resumed = trainer()
    resumed.resume()
    resumed.fit()
    best = load_checkpoint(tmp_path / "best")
    assert best.step == resumed.early_stopping.best_step
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, best.model[k])
