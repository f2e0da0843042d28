"""The run directory: its lock, the resolved config.json, resume from anywhere, and the user-fixable errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from descend.cli import classify, main

TINY = ["--steps", "4", "--batch-size", "16", "--width", "8", "--threads", "1", "--no-progress"]


def descend(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "descend", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("descend: error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_second_run_in_the_same_directory_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "descend", "train", "--steps", "100000", "--width", "8", "--threads", "1"]
    command += ["--no-progress", "--checkpoint-every", "50", "--out", str(out)]
    first = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists():  # written once the lock is held
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        assert (out / ".lock").read_text().strip() == str(first.pid)
        for args in (["train", *TINY, "--out", str(out), "--overwrite"], ["train", "--resume", str(out)]):
            started = time.monotonic()
            second = descend(*args)
            line = _one_line(second.stderr)
            assert second.returncode == 2 and f"in use by process {first.pid}" in line, second.stderr
            assert time.monotonic() - started < 30
        while not (out / "checkpoint" / "latest.json").exists():
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the lock file of the killed process is left behind, but not held: a resume takes it over
    assert (out / ".lock").exists()
    reached = json.loads((out / "checkpoint" / "latest.json").read_text())["step"]
    resumed = descend("train", "--resume", str(out), "--steps", str(reached + 10))
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the lock of process {first.pid}" in resumed.stdout
    assert not (out / ".lock").exists()  # released on exit


def test_config_records_resolved_values_and_resume_works_from_another_directory(tmp_path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 2))
    data = tmp_path / "data" / "d.csv"
    data.parent.mkdir()
    data.write_text("a,b,label\n" + "\n".join(f"{a},{b},{int(a > 0)}" for a, b in X) + "\n")
    first = descend("train", "--data", "data/d.csv", "--target", "label", *TINY, "--out", "runs/r", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "classification with 2 classes" in first.stdout  # the inferred task is printed
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert config["lr"] == 1e-3 and config["task"] == "classification" and config["l2"] == 1e-3
    assert config["data"] == str(data.resolve())
    assert config["weight_decay"] == 0.0 and (config["steps"], config["epochs"]) == (4, None)  # resolved, one budget
    resolved = config["resolved"]
    assert resolved["total_steps"] == 4 and resolved["eval_every"] >= 1
    assert resolved["num_classes"] == 2 and resolved["classes"] == [0, 1] and resolved["in_features"] == 2
    assert resolved["parameters"] == (2 + 1) * 8 + (8 + 1) * 8 + (8 + 1) * 2  # mlp, depth 2, width 8
    import hashlib

    assert resolved["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = descend("train", "--resume", str(tmp_path / "runs" / "r"), "--steps", "8", cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert "changed" not in resumed.stderr
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["steps"] == 8
    data.write_text(data.read_text() + "0.5,0.5,1\n")  # the data changes: resuming warns
    again = descend("train", "--resume", str(tmp_path / "runs" / "r"), "--steps", "10", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert "changed since the run started" in again.stderr


def test_tensorboard_and_device_errors_are_exit_2(tmp_path, capsys) -> None:
    import importlib.util

    import torch

    out = str(tmp_path / "x")
    if importlib.util.find_spec("tensorboard") is None:
        assert main(["train", *TINY, "--tensorboard", "--out", out]) == 2
        assert "pip install tensorboard" in _one_line(capsys.readouterr().err)
    if not torch.cuda.is_available():
        assert main(["train", *TINY, "--device", "cuda", "--out", out]) == 2
        assert "--device cuda" in _one_line(capsys.readouterr().err)
    assert main(["train", *TINY, "--device", "tpu", "--out", out]) == 2
    assert "--device must be" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_diverged_runs_print_a_warning_and_exit_1(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2))
    (tmp_path / "r.csv").write_text("a,b,y\n" + "\n".join(f"{a},{b},{3 * a - b + 0.1}" for a, b in X) + "\n")
    args = ["train", "--data", str(tmp_path / "r.csv"), "--target", "y", "--model", "linear", "--optimizer",
            "signsgd", "--lr", "30", "--steps", "20", "--eval-every", "5", "--no-progress", "--out",
            str(tmp_path / "d")]  # fmt: skip
    code = main(args)
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["diverged"] is True and code == 1
    assert "warning:" in err and "diverged" in err
    assert err.strip().splitlines()[-1].startswith("descend: error: the run diverged: the validation loss rose")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_out_is_exit_2(tmp_path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = descend("train", *TINY, "--out", str(locked / "run"))
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2 and "permission denied" in _one_line(result.stderr)


def test_os_errors_the_user_can_fix_are_one_line_exit_2(tmp_path) -> None:
    import errno

    (tmp_path / "file").write_text("x")
    result = descend("train", *TINY, "--out", str(tmp_path / "file" / "run"))
    assert result.returncode == 2 and "not a directory" in _one_line(result.stderr)
    cases = [
        (PermissionError(errno.EACCES, "Permission denied", "/x"), "permission denied: /x"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), "not a directory: /f/x"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/d"), "/d is a directory"),
        (OSError(errno.ENOSPC, "No space left on device", "/full/model.safetensors"), "no space left"),
    ]
    for error, expected in cases:
        code, message = classify(error)
        assert code == 2 and expected in message and "\n" not in message
    full = OSError(errno.ENOSPC, "No space left on device", "/full/m")
    full.bytes_needed = 1234  # type: ignore[attr-defined]
    assert "1234 bytes needed" in classify(full)[1]
    assert classify(RuntimeError("boom"))[0] == 1


def test_resume_the_budget_given_last_wins_and_a_reached_budget_is_refused(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 4))
    species = np.array(["setosa", "versicolor", "virginica"])[np.argmax(X[:, :3], axis=1)]
    data = tmp_path / "iris.csv"
    data.write_text("a,b,c,d,species\n" + "\n".join(",".join([*map(str, x), s]) for x, s in zip(X, species)) + "\n")
    run = tmp_path / "r"
    fast = ["--width", "8", "--threads", "1", "--no-progress"]
    assert main(["train", "--data", str(data), "--target", "species", "--epochs", "5", *fast, "--out", str(run)]) == 0
    per_epoch = 4  # 105 training rows in minibatches of 32

    def state() -> tuple[int, dict]:
        summary = json.loads((run / "summary.json").read_text())
        return summary["steps"], json.loads((run / "config.json").read_text())

    steps, config = state()
    assert steps == 5 * per_epoch and (config["steps"], config["epochs"]) == (None, 5.0)
    assert main(["train", "--resume", str(run), "--steps", "60"]) == 0
    steps, config = state()
    assert steps == 60 and (config["steps"], config["epochs"]) == (60, None)  # one budget, not both
    assert main(["train", "--resume", str(run), "--epochs", "40"]) == 0
    steps, config = state()
    assert steps == 40 * per_epoch and (config["steps"], config["epochs"]) == (None, 40.0)
    capsys.readouterr()
    before = (run / "config.json").read_bytes()
    for budget in (["--steps", "100"], ["--epochs", "40"]):  # below, and at, the 160 steps the run has
        assert main(["train", "--resume", str(run), *budget]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "the run already has 160 steps" in line and "give a larger --steps" in line, line
    assert (run / "config.json").read_bytes() == before and state()[0] == 160  # nothing rewritten


def test_config_records_the_optimizers_own_weight_decay(tmp_path) -> None:
    import inspect

    from descend import optim

    for name in ("adamw", "lion", "sgd"):
        out = tmp_path / name
        assert main(["train", "--optimizer", name, *TINY, "--out", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        defaults = inspect.signature(optim.OPTIMIZERS[name]).parameters
        assert (config["weight_decay"], config["lr"]) == (defaults["weight_decay"].default, defaults["lr"].default)
