"""The trainer and ``descend train`` on 2 gloo ranks against the same run in one process.

The oracle is always the one-process run with the same global batch: its saved
``model.safetensors`` must match the multi-process run's. Runs that start torchrun take 10-40 s
each on a loaded 2-core CPU and are marked slow; every subprocess has a hard timeout after which
its whole process group is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _distributed_helpers import ENV, max_abs_diff, run
from descend.cli import main
from descend.cli._commands import _without_nproc
from descend.data.registry import load_data
from descend.runs import RunError, RunSpec, prepare
from descend.train import TrainConfig, Trainer, build_model, make_optimizer

# Uneven shards: 15 examples per micro-batch over 2 ranks (8 + 7), 2 micro-batches per step, L2 on.
TINY = ["--batch-size", "15", "--accumulation", "2", "--width", "16", "--threads", "1", "--no-progress",
        "--no-tensorboard", "--optimizer", "adamw"]


def descend(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    return run([sys.executable, "-m", "descend", "train", *args], timeout, env)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


# ------------------------------------------------------------------------------------------------
# In one process: option handling, sharded checkpoints, the failure hook
# ------------------------------------------------------------------------------------------------


def test_nproc_is_removed_from_the_workers_arguments() -> None:
    assert _without_nproc(["--nproc", "2", "--steps", "3"]) == ["--steps", "3"]
    assert _without_nproc(["--steps", "3", "--nproc=4"]) == ["--steps", "3"]


def test_bad_strategy_and_nproc_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((RunError, ValueError), match="strategy"):
        prepare(RunSpec(strategy="zero3", steps=1))
    assert main(["train", "--nproc", "0", "--steps", "1"]) == 2
    assert "--nproc must be" in capsys.readouterr().err
    assert main(["train", "--nproc", "2", "--strategy", "zero3", "--steps", "1"]) == 2  # before launching
    err = capsys.readouterr().err
    assert "--strategy" in err and "ddp" in err and "fsdp" in err


def _trainer(out: Path, steps: int = 6) -> Trainer:
    torch.manual_seed(0)
    bundle = load_data("digits", seed=0)
    model = build_model("mlp", bundle, width=16)
    config = TrainConfig(steps=steps, batch_size=15, accumulation=2, l2=1e-3, progress=False, tensorboard=False,
                         checkpoint_every=3)
    return Trainer(model, make_optimizer("adamw", model.parameters()), bundle, config, out_dir=out)


def test_a_sharded_checkpoint_resumes_in_one_process(tmp_path: Path) -> None:
    """The DCP format a multi-process run writes, read back by one process, continues the run."""
    reference = _trainer(tmp_path / "ref")
    reference.fit()
    first = _trainer(tmp_path / "run")
    first.fit(max_steps=3)
    first.save_checkpoint(sharded=True)  # what FSDP2 ranks write; here from a world of one
    assert (tmp_path / "run" / "checkpoint" / "step-00000003" / ".metadata").is_file()
    second = _trainer(tmp_path / "run")
    assert second.resume() == 3
    second.fit()
    for p, q in zip(second.model.parameters(), reference.model.parameters()):
        assert float((p.detach() - q.detach()).abs().max()) <= 1e-6


def test_failure_hook_stops_its_rank_and_keeps_the_checkpoint(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESCEND_FAIL_AT_STEP", "5")
    monkeypatch.setenv("DESCEND_FAIL_RANK", "1")  # another rank: this process (rank 0) is unaffected
    assert _trainer(tmp_path / "other").fit()["steps"] == 6
    monkeypatch.setenv("DESCEND_FAIL_RANK", "0")
    trainer = _trainer(tmp_path / "run")
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        trainer.fit()
    monkeypatch.delenv("DESCEND_FAIL_AT_STEP")
    resumed = _trainer(tmp_path / "run")
    assert resumed.resume() == 3 and resumed.fit()["steps"] == 6


# ------------------------------------------------------------------------------------------------
# Two gloo ranks through the command line
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "options"),
    [
        ("nproc", ["--strategy", "ddp", "--steps", "6", *TINY]),
        ("torchrun", ["--strategy", "fsdp", "--steps", "6", *TINY]),
        ("nproc", ["--optimizer", "gd", "--chunk-size", "100", "--steps", "4", "--width", "16", "--threads", "1",
                   "--no-progress", "--no-tensorboard"]),  # full-batch GD: each rank its chunk shares
    ],
    ids=["ddp", "fsdp", "gd-full-batch"],
)
def test_two_processes_train_the_one_process_model(tmp_path: Path, launcher: str, options: list[str]) -> None:
    code, log, _ = descend(*options, "--out", str(tmp_path / "one"))
    assert code == 0, log[-3000:]
    if launcher == "nproc":
        code, log, _ = descend("--nproc", "2", *options, "--out", str(tmp_path / "two"))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "descend",
               "train", *options, "--out", str(tmp_path / "two")]
        code, log, _ = run(cmd, timeout=240)
    assert code == 0, log[-4000:]
    assert "on 2 processes" in log and log.count("test loss") == 1  # rank 0 alone prints
    assert max_abs_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-5
    rows = [(tmp_path / d / "metrics.jsonl").read_text().count("\n") for d in ("one", "two")]
    assert rows[0] == rows[1]  # one writer: rank 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_of_torchrun_with_c10d_rendezvous_train_the_one_process_model(tmp_path: Path) -> None:
    """What docs/guide/distributed.md tells a cluster to run, with both "nodes" on this host: two
    launchers, --nnodes 2, one process each, meeting through c10d rendezvous on 127.0.0.1 (gloo)."""
    options = ["--strategy", "ddp", "--steps", "6", *TINY]
    code, log, _ = descend(*options, "--out", str(tmp_path / "one"))
    assert code == 0, log[-3000:]
    endpoint = f"127.0.0.1:{_free_port()}"
    launchers = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
               "--rdzv_id", "descend-two-nodes", "--rdzv_conf", f"is_host={int(node == 0)}",
               "-m", "descend", "train", *options, "--out", str(tmp_path / "two")]  # fmt: skip
        launchers.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))  # fmt: skip
    logs = []
    try:
        for launcher in launchers:
            out, _ = launcher.communicate(timeout=300)
            logs.append(out)
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "on 2 processes" in "".join(logs) and "".join(logs).count("test loss") == 1  # global rank 0 alone
    assert max_abs_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-5
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert summaries[1]["test"]["loss"] == pytest.approx(summaries[0]["test"]["loss"], abs=1e-5)


@pytest.mark.slow
def test_fsdp_checkpoint_from_two_processes_resumes_in_one(tmp_path: Path) -> None:
    code, log, _ = descend("--steps", "8", *TINY, "--out", str(tmp_path / "ref"))
    assert code == 0, log[-3000:]
    run_dir = tmp_path / "run"
    code, log, _ = descend("--nproc", "2", "--strategy", "fsdp", "--steps", "4", *TINY, "--out", str(run_dir))
    assert code == 0, log[-4000:]
    assert (run_dir / "checkpoint" / "step-00000004" / ".metadata").is_file()  # sharded (DCP)
    code, log, _ = descend("--resume", str(run_dir), "--steps", "8")  # one process now
    assert code == 0, log[-3000:]
    assert max_abs_diff(weights(run_dir), weights(tmp_path / "ref")) <= 1e-6


@pytest.mark.slow
def test_a_failed_rank_ends_the_job_and_resume_continues(tmp_path: Path) -> None:
    options = ["--steps", "8", "--checkpoint-every", "2", *TINY]
    run_dir = tmp_path / "run"
    code, log, seconds = descend("--nproc", "2", *options, "--out", str(run_dir), timeout=120,
                                 env={"DESCEND_FAIL_AT_STEP": "5", "DESCEND_FAIL_RANK": "1"})
    assert code != 0 and seconds < 60, (code, seconds, log[-3000:])
    assert "descend: rank 1 failed: RuntimeError: injected failure at step 5" in log
    assert "descend: error: the 2-process run failed" in log
    assert not (run_dir / "model.safetensors").exists()
    assert '"step": 4' in (run_dir / "checkpoint" / "latest.json").read_text()
    code, log, _ = descend("--resume", str(run_dir), "--nproc", "2")
    assert code == 0, log[-4000:]
    code, log, _ = descend(*options, "--out", str(tmp_path / "ref"))
    assert code == 0, log[-3000:]
    assert max_abs_diff(weights(run_dir), weights(tmp_path / "ref")) <= 1e-5


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, grandchildren...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as ended)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_killing_the_launcher_ends_torchrun_and_every_rank(tmp_path: Path) -> None:
    """SIGKILL to ``descend train --nproc 2`` (a scheduler, the OOM killer) must not leave the job running."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "descend", "train", "--nproc", "2", "--steps", "100000", *TINY, "--out", str(run_dir)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # torchrun's agent and both ranks, the ranks training
            family = _descendants(launcher.pid)
            if len(family) >= 3 and (run_dir / "metrics.jsonl").is_file():
                break
            assert launcher.poll() is None, "the run ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail(f"the 2-process run did not start within 180 s (processes: {sorted(family)})")
        family = _descendants(launcher.pid)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in family):
            time.sleep(0.2)
        assert not [p for p in family if _alive(p)], "processes of the run outlived the launcher"
    finally:
        for pid in [launcher.pid, *family]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
