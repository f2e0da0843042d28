"""End-to-end runs of the ``descend`` command in subprocesses: every subcommand, every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

TINY = ["--steps", "6", "--batch-size", "16", "--width", "16", "--threads", "1", "--no-progress"]


def descend(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "descend", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_help_for_every_subcommand(capsys) -> None:
    from descend.cli import main

    result = descend("--help")  # the real entry point once; each subcommand's help in-process (fast)
    assert result.returncode == 0 and "usage: descend" in result.stdout and "compare" in result.stdout
    for command in ("train", "compare", "gradflow", "optimizers"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: descend {command}" in capsys.readouterr().out
    assert "--batch-size" in descend("train", "--help").stdout


def test_train_writes_every_file(tmp_path) -> None:
    out = tmp_path / "run"
    result = descend("train", *TINY, "--optimizer", "sgd", "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "model.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint" / "latest.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"train", "val", "test", "steps", "seconds"} and summary["steps"] == 6
    assert 0 <= summary["test"]["accuracy"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "sgd" and config["steps"] == 6
    assert set(load_file(out / "model.safetensors")) == {
        "blocks.0.linear.weight",
        "blocks.0.linear.bias",
        "blocks.1.linear.weight",
        "blocks.1.linear.bias",
        "head.weight",
        "head.bias",
    }


def test_resume_through_the_cli_is_bit_identical(tmp_path) -> None:
    opts = ["--batch-size", "16", "--width", "16", "--threads", "1", "--optimizer", "adam", "--no-progress"]
    assert descend("train", *opts, "--steps", "10", "--out", str(tmp_path / "full")).returncode == 0
    assert descend("train", *opts, "--steps", "5", "--out", str(tmp_path / "part")).returncode == 0
    result = descend("train", "--resume", str(tmp_path / "part"), "--steps", "10")
    assert result.returncode == 0, result.stderr
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "part" / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["steps"] == 10


def test_config_file_and_set(tmp_path) -> None:
    (tmp_path / "c.toml").write_text('optimizer = "signum"\nsteps = 3\nwidth = 8\nbatch-size = 10\nprogress = false\n')
    result = descend(
        "train",
        "--config",
        str(tmp_path / "c.toml"),
        "--set",
        "lr=0.002",
        "--set",
        "steps=4",
        "--out",
        str(tmp_path / "r"),
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["optimizer"], config["lr"], config["steps"], config["width"]) == ("signum", 0.002, 4, 8)


def test_gd_and_csv_regression(tmp_path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    rows = "\n".join(",".join(f"{v:.5f}" for v in (*x, x @ [1.0, -2.0, 0.5])) for x in X)
    (tmp_path / "r.csv").write_text("a,b,c,y\n" + rows + "\n")
    result = descend(
        "train",
        "--data",
        str(tmp_path / "r.csv"),
        "--target",
        "y",
        "--model",
        "linear",
        "--optimizer",
        "gd",
        "--lr",
        "0.5",
        "--steps",
        "100",
        "--l2",
        "0",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "accuracy" not in summary["test"] and summary["test"]["loss"] < 1e-3  # y is linear in X


def test_compare_tiny(tmp_path) -> None:
    out = tmp_path / "cmp"
    result = descend(
        "compare",
        "--task",
        "digits-mlp",
        "--optimizers",
        "sgd,signum",
        "--seeds",
        "2",
        "--steps",
        "20",
        "--workers",
        "1",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "signum" in result.stdout and "±" in result.stdout
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"]["digits-mlp"]
    assert sorted(n for g in task["ranking"] for n in g["members"]) == ["sgd", "signum"]
    assert len(task["optimizers"]["sgd"]["runs"]) == 2
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 2  # one row per task and optimizer
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "signum" in html  # curves, lr sweep: one task, no profile
    assert "Not drawn: this run has 1 task" in html


def test_gradflow_and_optimizers(tmp_path) -> None:
    result = descend(
        "gradflow",
        "--depth",
        "4",
        "--width",
        "8",
        "--activations",
        "tanh,relu",
        "--batch",
        "32",
        "--out",
        str(tmp_path / "g"),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "g" / "gradflow.png").read_bytes()[:4] == b"\x89PNG"
    flow = json.loads((tmp_path / "g" / "gradflow.json").read_text())
    assert set(flow) == {"tanh plain", "tanh residual", "relu plain", "relu residual"}
    result = descend("optimizers")
    assert result.returncode == 0
    for name in ("gd", "sgd", "momentum", "signsgd", "signum", "softsign", "lion", "adam", "adamw"):
        assert f"\n{name}  default lr" in "\n" + result.stdout


def test_nan_loss_exits_non_zero_and_keeps_the_checkpoint(tmp_path) -> None:
    out = tmp_path / "nan"
    X = np.random.default_rng(0).normal(size=(40, 2))
    (tmp_path / "r.csv").write_text("a,b,y\n" + "\n".join(f"{a},{b},{a + b}" for a, b in X) + "\n")
    result = descend(
        "train",
        "--data",
        str(tmp_path / "r.csv"),
        "--target",
        "y",
        "--model",
        "linear",
        "--optimizer",
        "gd",
        "--lr",
        "100",
        "--steps",
        "500",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "1000",
        "--l2",
        "0",
        "--no-progress",
        "--out",
        str(out),
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("descend: error: the loss became") and "Traceback" not in result.stderr
    )
    assert (out / "checkpoint" / "latest.json").is_file()


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "text.csv").write_text("a,b,y\n1,hello,0\n2,3,1\n3,4,0\n4,5,1\n")
    (tmp / "nan.csv").write_text("a,y\n1,0\nnan,1\n3,0\n4,1\n")
    (tmp / "empty.csv").write_text("")
    (tmp / "ok.csv").write_text("a,y\n1,0\n2,1\n3,0\n4,1\n5,0\n")
    (tmp / "taken").mkdir()
    (tmp / "taken" / "config.json").write_text("{}")
    (tmp / "corrupt" / "checkpoint" / "step-00000001").mkdir(parents=True)
    (tmp / "corrupt" / "config.json").write_text(json.dumps({"optimizer": "sgd", "steps": 2}))
    (tmp / "corrupt" / "checkpoint" / "latest.json").write_text('{"format": 1, "step": 1, "dir": "step-00000001"}')
    (tmp / "corrupt" / "checkpoint" / "step-00000001" / "state.json").write_text("{garbage")
    out = ["--out", str(tmp / "new")]
    return [
        (["train", "--data", str(tmp / "missing.csv"), "--target", "y", *out], "does not exist"),
        (["train", "--data", str(tmp / "ok.csv"), "--target", "nope", *out], "no column 'nope'"),
        (["train", "--data", str(tmp / "text.csv"), "--target", "y", *out], "column 'b' is not numeric"),
        (["train", "--data", str(tmp / "nan.csv"), "--target", "y", *out], "'a' has a missing value at line 3 ('nan')"),
        (["train", "--data", str(tmp / "empty.csv"), "--target", "y", *out], "empty"),
        (["train", "--lr", "-0.1", *out], "--lr must be > 0"),
        (["train", "--optimizer", "rmsprop", *out], "unknown optimizer 'rmsprop'"),
        (["train", "--model", "cnn", *out], "unknown model 'cnn'"),
        (["train", "--data", "mnist", *out], "unknown dataset 'mnist'"),
        (["train", "--data", "digits", "--model", "pointset", *out], "needs point-set data"),
        (["train", "--resume", str(tmp / "corrupt")], "corrupt"),
        (["train", "--out", str(tmp / "taken")], "already holds a run"),
        (["train", "--set", "nonsense=1", *out], "unknown option 'nonsense'"),
        (["train", "--steps", "many", *out], "invalid int value"),
        (["compare", "--optimizers", "sgd,foo", *out], "unknown optimizer 'foo'"),
        (["gradflow", "--activations", "swish", *out], "unknown"),
    ]


def test_bad_inputs_are_one_line_errors_with_exit_2(tmp_path) -> None:
    started = time.perf_counter()
    failures = []
    for args, expected in _bad_inputs(tmp_path):
        result = descend(*args)
        lines = result.stderr.strip().splitlines()
        ok = (
            result.returncode == 2
            and len(lines) == 1
            and lines[0].startswith("descend: error: ")
            and expected in lines[0]
            and "Traceback" not in result.stderr
        )
        if not ok:
            failures.append((args, result.returncode, result.stderr))
    assert not failures, failures
    assert not (tmp_path / "new").exists()  # a refused run leaves nothing behind
    assert time.perf_counter() - started < 240


def test_debug_shows_the_traceback(tmp_path) -> None:
    result = descend("train", "--data", "mnist", "--debug", "--out", str(tmp_path / "x"))
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_the_default_digits_mlp_adam_run_reaches_97_percent_on_each_of_3_seeds(tmp_path) -> None:
    accuracies, kept = [], []
    for seed in range(3):
        out = tmp_path / f"d{seed}"
        result = descend("train", "--data", "digits", "--model", "mlp", "--optimizer", "adam", "--seed", str(seed),
                         "--no-progress", "--out", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        summary = json.loads((out / "summary.json").read_text())
        accuracies.append(summary["test"]["accuracy"])
        kept.append((summary["weights_step"], summary["steps"]))
        assert summary["weights_step"] == summary["best_step"] and not summary["diverged"]
    print(f"descend train --data digits --model mlp --optimizer adam, seeds 0-2: test accuracy {accuracies}; "
          f"(weights kept from step, of steps) {kept}")
    assert min(accuracies) >= 0.97


@pytest.mark.slow
def test_compare_defaults_run_the_quick_suite_within_3_minutes(tmp_path) -> None:
    started = time.perf_counter()
    result = descend("compare", "--out", str(tmp_path / "c"), timeout=600)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert "text-lm" in results["tasks"] and len(results["tasks"]) >= 3
    print(f"descend compare defaults: {seconds:.1f}s wall, {results['environment']}")
    assert seconds < 180
