"""``descend generate``: sampling text from a language model trained on your own text, end to end."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

TINY_LM = ["--model", "transformer", "--width", "16", "--depth", "1", "--steps", "3", "--batch-size", "4",
           "--threads", "1", "--no-progress"]


def descend(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "descend", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    words = ["the", "cat", "sat", "on", "a", "mat", "und", "für", "café"]  # multi-byte characters too
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)), encoding="utf-8")
    result = descend("train", "--data", str(root / "text.txt"), *TINY_LM, "--out", str(root / "run"))
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_generate_prints_the_prompt_and_a_seeded_continuation(lm_run: Path) -> None:
    first = descend("generate", str(lm_run), "--prompt", "the cat", "--tokens", "40", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("the cat") and len(first.stdout.encode()) >= len("the cat") + 1
    again = descend("generate", str(lm_run), "--prompt", "the cat", "--tokens", "40", "--seed", "3")
    other = descend("generate", str(lm_run), "--prompt", "the cat", "--tokens", "40", "--seed", "4")
    assert again.stdout == first.stdout and other.stdout != first.stdout
    greedy = descend("generate", str(lm_run), "--prompt", "a", "--tokens", "5", "--temperature", "0")
    assert greedy.returncode == 0 and greedy.stdout.startswith("a")


def test_generate_library_call_streams_the_text(lm_run: Path) -> None:
    from descend.runs._generate import generate_text

    result = generate_text(lm_run, "mat", 30, seed=1)
    pieces = list(result.pieces)
    assert result.context == 64 and not result.prompt_truncated
    assert 1 <= len(pieces) <= 30 and all(isinstance(p, str) and p for p in pieces)


def test_a_prompt_longer_than_the_context_is_read_from_its_end(lm_run: Path) -> None:
    result = descend("generate", str(lm_run), "--prompt", "x" * 100, "--tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "the prompt has 100 bytes; the model reads its last 64" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--top-p", "1.5"], "sampling settings out of range"),
])
def test_bad_sampling_input_is_one_line_and_exit_2(lm_run: Path, args: list[str], message: str) -> None:
    result = descend("generate", str(lm_run), *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_a_run_that_is_not_a_language_model_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "mlp"
    trained = descend("train", "--steps", "2", "--width", "8", "--threads", "1", "--no-progress", "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    result = descend("generate", str(run), "--prompt", "hi")
    assert result.returncode == 2 and "not a language model" in result.stderr
    missing = descend("generate", str(tmp_path / "nothing"), "--prompt", "hi")
    assert missing.returncode == 2 and "not a run directory" in missing.stderr


def test_bf16_autocast_is_a_choice_and_off_by_default_on_the_cpu(lm_run: Path) -> None:
    from descend.runs._generate import generate_text

    plain = "".join(generate_text(lm_run, "the", 20, seed=2, device="cpu").pieces)
    assert plain == "".join(generate_text(lm_run, "the", 20, seed=2, device="cpu", bf16=False).pieces)
    assert len("".join(generate_text(lm_run, "the", 20, seed=2, device="cpu", bf16=True).pieces)) >= 1


def test_activation_checkpointing_is_an_option_for_block_models_only(tmp_path: Path) -> None:
    ok = descend("train", "--model", "resmlp", "--depth", "2", "--width", "8", "--steps", "2", "--threads", "1",
                 "--checkpoint-activations", "--no-progress", "--out", str(tmp_path / "res"))
    assert ok.returncode == 0, ok.stderr
    import json

    assert json.loads((tmp_path / "res" / "config.json").read_text())["checkpoint_activations"] is True
    refused = descend("train", "--model", "mlp", "--steps", "2", "--checkpoint-activations", "--out", str(tmp_path))
    assert refused.returncode == 2 and "model 'mlp' has none" in refused.stderr
