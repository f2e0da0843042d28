"""Bounded evaluation: at most ``eval_size`` examples (tokens, for text) per evaluation, the same ones each time."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from descend.data._base import DataBundle, Split
from descend.nn import TransformerLM
from descend.train import TrainConfig, Trainer


def _table(m: int = 1000) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(m, 4, generator=g), torch.randint(3, (m,), generator=g)
    split = Split((x,), y)
    return DataBundle("toy", "classification", "vector", split, split, split, out_features=3, in_features=4)


def test_an_evaluation_reads_the_evenly_spaced_subset_it_is_bounded_to() -> None:
    data = _table()
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    for size in (1, 7, 300, 999, 1000, 5000, None):
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), 0.0), data, TrainConfig(steps=1, eval_size=size))
        got = trainer.evaluate("val", chunk_size=64)
        n = 1000 if size is None else min(size, 1000)
        index = torch.tensor([i * 1000 // n for i in range(n)])  # floor(i N / n): spread over the whole split
        x, y = data.val.inputs[0][index], data.val.targets[index]
        with torch.no_grad():
            out = model(x)
        assert got["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
        assert got["accuracy"] == pytest.approx(float((out.argmax(1) == y).double().mean()), abs=1e-12)
        assert trainer.evaluate("val", chunk_size=64) == got  # the same examples every time
    with torch.no_grad():
        whole = float(F.cross_entropy(model(data.val.inputs[0]), data.val.targets))
    assert trainer.evaluate("val", whole=True)["loss"] == pytest.approx(whole, rel=1e-5)


def test_for_token_sequences_the_bound_counts_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 256, (50, 9), generator=g)
    split = Split((windows[:, :-1],), windows[:, 1:])  # 50 examples of 8 tokens
    data = DataBundle("text", "classification", "tokens", split, split, split, out_features=256, info={"context": 8})
    torch.manual_seed(0)
    model = TransformerLM(256, 8, width=16, depth=1, heads=2)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), 0.0), data, TrainConfig(steps=1, eval_size=100))
    got = trainer.evaluate("val")
    index = torch.tensor([i * 50 // 13 for i in range(13)])  # ceil(100 tokens / 8 per window) = 13 windows
    with torch.no_grad():
        logits = model(split.inputs[0][index])
    expected = F.cross_entropy(logits.reshape(-1, 256), split.targets[index].reshape(-1))
    assert got["loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_the_end_of_run_evaluation_does_not_set_the_peak_memory(tmp_path) -> None:
    """The 3.2M-parameter language model, 3 steps at batch 1: peak RSS with the default bound against almost none."""
    probe = textwrap.dedent(
        """
        import json, resource, subprocess, sys, time
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "descend", *sys.argv[1:]], capture_output=True, text=True)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps({"rc": done.returncode, "err": done.stderr[-500:], "peak_mib": peak_kib / 1024,
                          "seconds": time.perf_counter() - start}))
        """
    )
    runs = {}
    for size in ("16384", "1"):
        args = ["train", "--data", "stdlib-text", "--model", "transformer", "--width", "256", "--depth", "4",
                "--steps", "3", "--batch-size", "1", "--threads", "2", "--no-progress", "--eval-size", size,
                "--out", str(tmp_path / size)]
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=900)
        runs[size] = json.loads(out.stdout)
        assert runs[size]["rc"] == 0, runs[size]["err"]
    print({k: {"peak_mib": round(v["peak_mib"]), "seconds": round(v["seconds"], 1)} for k, v in runs.items()})
    assert runs["16384"]["peak_mib"] <= 1.3 * runs["1"]["peak_mib"]
    config = json.loads((tmp_path / "16384" / "config.json").read_text())
    assert config["eval_size"] == 16384
    summary = json.loads((tmp_path / "16384" / "summary.json").read_text())
    assert summary["test"]["bits_per_byte"] == pytest.approx(summary["test"]["loss"] / math.log(2))
