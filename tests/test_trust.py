"""Trust and failure: no code runs from a run directory, every checkpoint byte is verified.

Each case of the tampering matrix says what is changed in a run's checkpoints and what must
happen: the checkpoint is refused with a one-line CheckpointError, or resume falls back to the
newest checkpoint that verifies, warns in one line, and keeps the bad one aside.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from descend import distributed as dd
from descend.checkpoint._local import commit_checkpoint, is_sharded, latest_dir, load_checkpoint, save_checkpoint
from descend.checkpoint._tensorfile import (
    CheckpointWarning,
    read_checked_json,
    verify_step,
    write_checked_json,
    write_manifest,
)
from descend.data._base import DataBundle, Split
from descend.train import CheckpointError, TrainConfig, Trainer


class _Payload:
    """Unpickling this creates ``path``: proof that a pickle from the run directory was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _plant(directory: Path, marker: Path) -> None:
    """The issue's repro: a pickle payload as ``.metadata`` and ``{}`` as ``extra.json``."""
    (directory / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (directory / "extra.json").write_text("{}")


def _run(root: Path, steps=(2, 4), keep: int = 5) -> dict[int, dict[str, torch.Tensor]]:
    """One-process checkpoints at ``steps`` under ``root``; returns each step's model tensors."""
    models = {}
    for step in steps:
        models[step] = {"w": torch.full((3,), float(step))}
        save_checkpoint(root, step, models[step], {"step": step, "m": torch.arange(4.0) * step}, keep=keep)
    return models


def _resume(root: Path) -> tuple[Path, list[str]]:
    """``latest_dir`` as resume calls it; returns the directory and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = latest_dir(root)
    return path, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def _rewrite_json(path: Path, change: Callable[[dict], None], *, recompute: bool) -> None:
    """Edit a checksummed JSON file; with ``recompute`` the forger also fixes its checksum."""
    data = json.loads(path.read_text())
    change(data)
    if recompute:
        write_checked_json(path, data)
    else:
        path.write_text(json.dumps(data))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _forge_state_step(d: Path) -> None:
    meta = json.loads((d / "state.json").read_text())
    meta["step"] = -5
    (d / "state.json").write_text(json.dumps(meta))


# ---- the matrix: tampering with the newest step directory falls back to the previous one -----------
STEP_CASES = {
    "planted .metadata pickle": lambda d, marker: _plant(d, marker),
    "state.json step forged to -5": lambda d, marker: _forge_state_step(d),
    "model.safetensors bit flip": lambda d, marker: _flip_last_byte(d / "model.safetensors"),
    "state.safetensors truncated": lambda d, marker: (d / "state.safetensors").write_bytes(b"\0" * 10),
    "state.safetensors deleted": lambda d, marker: (d / "state.safetensors").unlink(),
    "extra file planted": lambda d, marker: (d / "evil.pt").write_bytes(pickle.dumps(_Payload(marker))),
    "manifest edited, checksum kept": lambda d, marker: _rewrite_json(
        d / "manifest.json", lambda m: m.update(step=3), recompute=False
    ),
    "manifest forged with step -5": lambda d, marker: _rewrite_json(
        d / "manifest.json", lambda m: m.update(step=-5), recompute=True
    ),
    "manifest forged to kind dcp": lambda d, marker: _rewrite_json(
        d / "manifest.json", lambda m: m.update(kind="dcp"), recompute=True
    ),
    "manifest deleted": lambda d, marker: (d / "manifest.json").unlink(),
    "manifest not JSON": lambda d, marker: (d / "manifest.json").write_text("{not json"),
    "file replaced by a link": lambda d, marker: (
        (d / "state.json").unlink(),
        (d / "state.json").symlink_to(d.parent / "step-00000002" / "state.json"),
    ),
}

STEP_MESSAGES = {
    "planted .metadata pickle": r"\.metadata, a file its manifest does not name",
    "state.json step forged to -5": r"state\.json does not match its recorded SHA-256",
    "model.safetensors bit flip": r"model\.safetensors does not match its recorded SHA-256",
    "state.safetensors truncated": r"state\.safetensors does not match",
    "state.safetensors deleted": r"state\.safetensors is missing",
    "extra file planted": r"evil\.pt, a file its manifest does not name",
    "manifest edited, checksum kept": "does not match its checksum",
    "manifest forged with step -5": r"malformed manifest\.json",
    "manifest forged to kind dcp": r"manifest\.json: it does not name \.metadata",
    "manifest deleted": r"has no manifest\.json",
    "manifest not JSON": "not valid JSON",
    "file replaced by a link": "not a plain file",
}


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_a_tampered_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path: Path, case: str) -> None:
    root, marker = tmp_path / "checkpoint", tmp_path / "MARKER"
    models = _run(root)
    newest = root / "step-00000004"
    STEP_CASES[case](newest, marker)
    path, said = _resume(root)
    assert path == root / "step-00000002"
    assert len(said) == 1 and "\n" not in said[0], said
    assert re.search(STEP_MESSAGES[case], said[0]), said[0]
    assert "resuming from step-00000002" in said[0] and "kept as step-00000004.rejected" in said[0]
    assert (root / "step-00000004.rejected").is_dir() and not newest.exists()  # kept aside, not deleted
    ckpt = load_checkpoint(root)  # latest.json now names the good one: no second warning
    assert ckpt.step == 2 and torch.equal(ckpt.model["w"], models[2]["w"])
    assert _resume(root) == (root / "step-00000002", [])
    assert not marker.exists()


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_a_tampered_only_checkpoint_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    root, marker = tmp_path / "checkpoint", tmp_path / "MARKER"
    _run(root, steps=(2, 4), keep=1)
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["step-00000004"]
    if case == "file replaced by a link":  # its target must exist outside the step directory
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "state.json").write_text("{}")
        (root / "step-00000004" / "state.json").unlink()
        (root / "step-00000004" / "state.json").symlink_to(tmp_path / "elsewhere" / "state.json")
    else:
        STEP_CASES[case](root / "step-00000004", marker)
    with pytest.raises(CheckpointError, match=STEP_MESSAGES[case]) as e:
        load_checkpoint(root)
    assert "\n" not in str(e.value) and "no other checkpoint" in str(e.value)
    assert (root / "step-00000004").is_dir()  # nothing verifies: nothing is moved
    assert not marker.exists()


# ---- the matrix: tampering with latest.json -------------------------------------------------------------
def _other_run(tmp_path: Path) -> Path:
    other = tmp_path / "other" / "checkpoint"
    _run(other, steps=(9,))
    return other


def _point(root: Path, name: str, step: int) -> None:
    """A forger's ``latest.json``: naming ``name`` (also as the healthy one), checksum recomputed."""
    _rewrite_json(root / "latest.json", lambda e: e.update(dir=name, step=step, healthy=name), recompute=True)


LATEST_CASES = {
    "dir is ../ another run": (
        lambda root, other: _point(root, "../../other/checkpoint/step-00000009", 9),
        "not a step-NNNNNNNN directory",
    ),
    "dir is an absolute path": (
        lambda root, other: _point(root, str(other / "step-00000009"), 9),
        "not a step-NNNNNNNN directory",
    ),
    "dir is a symbolic link out of the run": (
        lambda root, other: (
            (root / "step-00000009").symlink_to(other / "step-00000009"),
            _point(root, "step-00000009", 9),
        ),
        "symbolic link",
    ),
    "step edited, checksum kept": (
        lambda root, other: _rewrite_json(root / "latest.json", lambda e: e.update(step=-5), recompute=False),
        "does not match its checksum",
    ),
    "step forged to disagree with dir": (
        lambda root, other: _rewrite_json(root / "latest.json", lambda e: e.update(step=-5), recompute=True),
        "malformed",
    ),
    "not JSON": (lambda root, other: (root / "latest.json").write_text("garbage"), "not valid JSON"),
    "no checksum (format 1)": (
        lambda root, other: (root / "latest.json").write_text('{"format": 1, "step": 4, "dir": "step-00000004"}'),
        "has no checksum",
    ),
    "deleted": (lambda root, other: (root / "latest.json").unlink(), "missing"),
    "names a deleted step": (lambda root, other: _point(root, "step-00000007", 7), "not a directory"),
}


@pytest.mark.parametrize("case", sorted(LATEST_CASES))
def test_a_tampered_index_is_never_followed_out_of_the_run(tmp_path: Path, case: str) -> None:
    root = tmp_path / "run" / "checkpoint"
    _run(root, steps=(2, 4))
    other = _other_run(tmp_path)
    tamper, message = LATEST_CASES[case]
    tamper(root, other)
    path, said = _resume(root)
    assert path == root / "step-00000004"  # the newest that verifies, inside this run
    assert len(said) == 1 and message in said[0] and "\n" not in said[0], said
    assert load_checkpoint(root).step == 4
    assert read_checked_json(root / "latest.json", "index")["dir"] == "step-00000004"
    if case not in ("deleted", "names a deleted step", "dir is a symbolic link out of the run"):
        assert (root / "latest.json.rejected").is_file()  # the bad index is kept aside
    assert (other / "step-00000009").is_dir()  # the other run is untouched


def test_a_read_only_run_still_falls_back_without_moving_anything(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "checkpoint"
    _run(root)
    _flip_last_byte(root / "step-00000004" / "model.safetensors")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", refuse)
    monkeypatch.setattr("descend.checkpoint._local.write_checked_json", refuse)
    path, said = _resume(root)
    assert path == root / "step-00000002" and len(said) == 1 and "nothing was moved: Permission denied" in said[0]
    assert (root / "step-00000004").is_dir()


def test_the_unhealthy_latest_offers_the_last_healthy_one_which_pruning_keeps(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    save_checkpoint(root, 2, {"w": torch.zeros(1)}, {}, keep=1)
    for step in (4, 6):
        save_checkpoint(root, step, {"w": torch.zeros(1)}, {}, keep=1, healthy=False)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-00000002", "step-00000006"]
    path, said = _resume(root)
    assert path == root / "step-00000002" and len(said) == 1 and "unhealthy" in said[0]
    assert load_checkpoint(root / "step-00000006").step == 6  # still there, by its path


def test_temporaries_of_an_interrupted_save_are_removed_on_the_next_start(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    _run(root, steps=(2,))
    (root / ".step-00000004.k3j2").mkdir()
    (root / ".step-00000004.k3j2" / "model.safetensors").write_bytes(b"\0" * 1000)
    (root / ".latest.json.x1y2.tmp").write_text("{")
    (root / "step-00000006").mkdir()  # a multi-process save cut short: no manifest
    (root / "step-00000006" / "__0_0.distcp").write_bytes(b"\0" * 10)
    path, said = _resume(root)
    assert path == root / "step-00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000002"]
    assert len(said) == 1 and "step-00000006" in said[0] and "cut short" in said[0]
    (root / ".step-00000003.a").mkdir()  # and a fresh (not resumed) run's first save removes them too
    save_checkpoint(root, 8, {"w": torch.zeros(1)}, {})
    assert not list(root.glob(".*"))


def test_a_file_changed_after_verification_is_caught_despite_its_old_size_and_mtime(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    _run(root, steps=(2,))
    step = root / "step-00000002"
    verify_step(step)  # verified once: an unchanged directory is not hashed again
    stat = (step / "model.safetensors").stat()
    _flip_last_byte(step / "model.safetensors")
    os.utime(step / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    with pytest.raises(CheckpointError, match="does not match its recorded SHA-256"):
        verify_step(step)


def test_a_crash_between_rename_and_index_resumes_from_the_index(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    _run(root, steps=(2,))
    index = (root / "latest.json").read_bytes()
    _run(root, steps=(4,))
    (root / "latest.json").write_bytes(index)  # the step directory is complete, the index not yet replaced
    assert _resume(root) == (root / "step-00000002", [])


def test_a_checkpoint_of_the_previous_format_is_refused_with_a_reason(tmp_path: Path) -> None:
    step = tmp_path / "step-00000003"
    step.mkdir()
    (step / "state.json").write_text('{"format": 1, "step": 3, "sha256": {}, "state": {}}')
    with pytest.raises(CheckpointError, match="older descend"):
        load_checkpoint(step)


def test_a_step_directory_is_sharded_only_when_its_manifest_says_so(tmp_path: Path) -> None:
    root = tmp_path / "checkpoint"
    _run(root, steps=(2,))
    _plant(root / "step-00000002", tmp_path / "MARKER")
    assert not is_sharded(root / "step-00000002")


# ---- multi-process (DCP) checkpoints ------------------------------------------------------------------
def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    return model, optimizer


def _dcp_run(root: Path, step: int) -> tuple[Path, nn.Module]:
    """A DCP step directory as a multi-process run writes it (here from one process), committed."""
    model, optimizer = _model_and_optimizer()
    model(torch.randn(5, 3)).square().sum().backward()
    optimizer.step()
    name = f"step-{step:08d}"
    root.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dd.save_checkpoint(root / name, model, optimizer, extra={"step": step, "note": "x"})
    commit_checkpoint(root, step, name, kind="dcp")
    return root / name, model


def test_a_dcp_checkpoint_round_trips_through_the_verified_reader(tmp_path: Path) -> None:
    path, model = _dcp_run(tmp_path / "checkpoint", 6)
    manifest = verify_step(path, kind="dcp")
    assert {".metadata", "extra.json", "extra.safetensors"} <= set(manifest["files"]) and manifest["step"] == 6
    assert latest_dir(tmp_path / "checkpoint") == path and is_sharded(path)
    fresh, optimizer = _model_and_optimizer(seed=1)
    assert dd.load_checkpoint(path, fresh, optimizer) == {"step": 6, "note": "x"}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)  # a non-tensor entry, read without pickle
    with pytest.raises(CheckpointError, match="is a 'dcp' checkpoint, expected 'single'"):
        verify_step(path, kind="single")


def test_a_planted_metadata_in_a_dcp_checkpoint_is_refused_by_its_checksum(tmp_path: Path) -> None:
    path, _ = _dcp_run(tmp_path / "checkpoint", 6)
    marker = tmp_path / "MARKER"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match=r"\.metadata does not match its recorded SHA-256"):
        dd.load_checkpoint(path, model, optimizer)
    with pytest.raises(CheckpointError, match=r"\.metadata does not match") as e:
        latest_dir(tmp_path / "checkpoint")  # nothing else verifies
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_a_forged_manifest_still_cannot_run_code_from_the_metadata(tmp_path: Path) -> None:
    path, _ = _dcp_run(tmp_path / "checkpoint", 6)
    marker = tmp_path / "MARKER"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(path, "dcp", 6)  # the forger recomputes every checksum
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match=r"refusing to load posix\.system"):
        dd.load_checkpoint(path, model, optimizer)
    assert not marker.exists()


def test_non_tensor_dcp_entries_are_read_without_running_code(tmp_path: Path) -> None:
    from descend.checkpoint._distributed import _SafePlanner

    buffer = io.BytesIO()
    torch.save(_Payload(tmp_path / "MARKER"), buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        _SafePlanner().load_bytes(None, buffer)
    assert not (tmp_path / "MARKER").exists()


# ---- end to end: the Trainer and the command line -------------------------------------------------------
def _bundle() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(2, (40,), generator=g)
    s = Split((x,), y)
    return DataBundle("toy", "classification", "vector", s, s, s, out_features=2, in_features=4)


def _trainer(out: Path, steps: int) -> Trainer:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    cfg = TrainConfig(steps=steps, checkpoint_every=2, eval_every=2, progress=False, tensorboard=False)
    return Trainer(model, torch.optim.SGD(model.parameters(), 0.1), _bundle(), cfg, out_dir=out)


def test_trainer_resume_ignores_a_planted_dcp_checkpoint_and_uses_the_last_good_one(tmp_path: Path) -> None:
    _trainer(tmp_path / "run", 4).fit()
    root, marker = tmp_path / "run" / "checkpoint", tmp_path / "MARKER"
    _plant(root / "step-00000004", marker)  # the repro: a one-process step turned "DCP"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = _trainer(tmp_path / "run", 6).resume()
    assert step == 2 and not marker.exists()
    assert any("resuming from step-00000002" in str(w.message) for w in caught)
    # a DCP step whose .metadata is replaced (the --nproc 2 repro), made the newest
    path, _ = _dcp_run(root, 8)
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert _trainer(tmp_path / "run", 6).resume() == 2
    assert not marker.exists() and (root / "step-00000008.rejected").is_dir()


def test_cli_resume_with_a_planted_pickle_never_runs_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from descend.cli import main

    run, marker = tmp_path / "R", tmp_path / "MARKER"
    train = ["train", "--data", "digits", "--model", "mlp", "--width", "8", "--checkpoint-every", "5"]
    assert main([*train, "--steps", "10", "--out", str(run)]) == 0
    for step in ("step-00000005", "step-00000010"):
        _plant(run / "checkpoint" / step, marker)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "20"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    lines = [line for line in err.splitlines() if line.startswith("descend: error")]
    assert len(lines) == 1 and "a file its manifest does not name" in lines[0] and "Traceback" not in err


# ---- the exit-code table: what the command line does with each bad input of this page ------------------
def _csv(path: Path, text: bytes) -> Path:
    path.write_bytes(text)
    return path


def _rows(sep: str = ",", n: int = 40) -> bytes:
    return "".join(f"{i}{sep}{(i * 7) % 5}{sep}{i % 2}\n" for i in range(n)).encode()


EXIT_CASES = {
    # name: (file bytes, expected exit code, a phrase of the one-line error, or None when it runs)
    "utf-8 with BOM": (b"\xef\xbb\xbfa,b,label\n" + _rows(), 0, None),
    "semicolons": (b"a;b;label\n" + _rows(";"), 0, None),
    "tabs": (b"a\tb\tlabel\n" + _rows("\t"), 0, None),
    "latin-1 byte": (b"a,b,label\n" + _rows() + b"1,2,caf\xe9\n", 2, "--encoding"),
    "duplicate columns": (b"a,a,label\n" + _rows(), 2, "appear more than once"),
    "1e308 feature": (b"a,b,label\n" + _rows() + b"1e308,1,0\n", 2, "beyond float32's range"),
    "inf feature": (b"a,b,label\n" + _rows() + b"inf,1,0\n", 2, "infinite"),
    "nan feature": (b"a,b,label\n" + _rows() + b"nan,1,0\n", 2, "has a missing value"),
}


@pytest.mark.parametrize("case", sorted(EXIT_CASES))
def test_cli_exit_codes_for_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    from descend.cli import main

    text, code, phrase = EXIT_CASES[case]
    data = _csv(tmp_path / "d.csv", text)
    argv = ["train", "--data", str(data), "--target", "label", "--steps", "2", "--width", "4"]
    assert main([*argv, "--out", str(tmp_path / "R")]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if phrase is not None:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("descend: error:") and phrase in lines[0], err


def test_cli_resume_falls_back_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from descend.cli import main

    run = tmp_path / "R"
    argv = ["train", "--data", "digits", "--model", "mlp", "--width", "8", "--checkpoint-every", "5"]
    assert main([*argv, "--steps", "10", "--out", str(run)]) == 0
    _forge_state_step(run / "checkpoint" / "step-00000010")  # the "step": -5
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "15", "--no-progress"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("descend: warning:")]
    assert len(said) == 1 and "resuming from step-00000005" in said[0], said
    assert (run / "checkpoint" / "step-00000010.rejected").is_dir()
    assert read_checked_json(run / "checkpoint" / "latest.json", "index")["step"] == 15


@pytest.mark.slow
def test_a_replaced_metadata_in_a_two_rank_checkpoint_never_runs(tmp_path: Path) -> None:
    """The issue's second repro: a real ``--nproc 2`` (FSDP2, gloo) checkpoint whose .metadata is replaced."""
    import subprocess
    import sys

    run, marker = tmp_path / "R", tmp_path / "MARKER"
    argv = [sys.executable, "-m", "descend", "train", "--data", "digits", "--model", "mlp", "--width", "8",
            "--checkpoint-every", "3", "--threads", "1", "--no-progress", "--no-tensorboard"]
    first = subprocess.run([*argv, "--nproc", "2", "--strategy", "fsdp", "--steps", "6", "--out", str(run)],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = run / "checkpoint" / "step-00000006"
    assert is_sharded(newest) and verify_step(newest, kind="dcp")["step"] == 6
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    resume = [sys.executable, "-m", "descend", "train", "--resume", str(run), "--steps", "9"]
    second = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step-00000003" in second.stderr and "Traceback" not in second.stderr
    assert (run / "checkpoint" / "step-00000006.rejected").is_dir()


_SAVER = """
import sys, torch
from descend.checkpoint._local import save_checkpoint
root = sys.argv[1]
model = {"w": torch.randn(1024, 1024)}  # 4 MiB per step: a kill often lands mid-write
for step in range(1, 10_000):
    save_checkpoint(root, step, model, {"step": step, "m": model["w"] * step}, keep=2)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_kills_during_saves_leave_a_checkpoint_that_verifies_and_temporaries_that_go(tmp_path: Path) -> None:
    """SIGKILL a process that saves 4 MiB checkpoints in a loop, at several moments, until one kill
    has landed mid-save (about half do); after every kill the next start finds a verified checkpoint."""
    import subprocess
    import sys
    import time

    cut_short = 0
    for attempt in range(8):
        root = tmp_path / f"run{attempt}" / "checkpoint"
        saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(root)], stdout=subprocess.PIPE, text=True)
        try:
            assert saver.stdout is not None and saver.stdout.readline().strip() == "1"  # the first save is done
            time.sleep(0.2 + 0.13 * attempt)
        finally:
            saver.kill()  # no cleanup runs
            saver.wait(timeout=30)
        cut_short += bool(list(root.glob(".step-*")))
        ckpt = load_checkpoint(root)
        assert ckpt.step >= 1 and torch.equal(ckpt.state["m"], ckpt.model["w"] * ckpt.step)
        assert not list(root.glob(".*"))  # whatever the kill left was removed on this start
        if cut_short and attempt >= 2:
            break
    assert cut_short, "no kill landed during a save; the cleanup went untested"
