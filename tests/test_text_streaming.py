"""A corpus larger than memory: the keyed shuffle of a huge training split, and the peak memory of a big file's run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from descend.train import _sampling
from descend.train._sampling import KeyedPermutation, Minibatch


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), keys=st.lists(st.integers(0, 2**31 - 1), min_size=4, max_size=4))
def test_a_keyed_permutation_is_a_bijection_of_range_n(n: int, keys: list[int]) -> None:
    order = KeyedPermutation(n, torch.tensor(keys))(torch.arange(n))
    assert torch.equal(order.sort().values, torch.arange(n))


def test_keys_give_different_orders_and_batches_cost_only_their_size() -> None:
    n = 10**12  # far beyond memory as a stored order
    a, b = KeyedPermutation(n, torch.tensor([1, 2, 3, 4])), KeyedPermutation(n, torch.tensor([1, 2, 3, 5]))
    positions = torch.arange(123_456_789, 123_456_789 + 64)
    assert not torch.equal(a(positions), b(positions))
    assert bool((a(positions) < n).all()) and len(set(a(positions).tolist())) == 64


def test_a_large_split_is_shuffled_by_key_each_example_once_an_epoch_and_resumes_exactly(monkeypatch) -> None:
    monkeypatch.setattr(_sampling, "STORED_ORDER_LIMIT", 100)  # the keyed mode, at a size a test can check
    n = 1003
    sampler = Minibatch(n, 64, seed=5)
    epoch = torch.cat([sampler.next_step()[0] for _ in range(sampler.steps_per_epoch)])
    assert torch.equal(epoch.sort().values, torch.arange(n))
    assert sampler.state_dict()["order"].numel() == 4  # the keys, not n indices
    for _ in range(3):
        sampler.next_step()
    saved = sampler.state_dict()
    expected = [sampler.next_step()[0] for _ in range(20)]  # crosses into the next epoch
    again = Minibatch(n, 64, seed=999)
    again.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(expected, [again.next_step()[0] for _ in range(20)]))
    second = torch.cat([sampler.next_step()[0] for _ in range(sampler.steps_per_epoch)])
    assert not torch.equal(second, epoch)


@pytest.mark.slow
def test_peak_memory_on_a_large_text_file_is_that_of_a_small_one(tmp_path) -> None:
    """200 MB against 2 MB of text: the run reads windows from disk, so its peak resident set is the same."""
    line = b"the quick brown fox jumps over the lazy dog; " * 20 + b"\n"
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_bytes(line * (2_000_000 // len(line)))
    with large.open("wb") as f:
        block = line * (10_000_000 // len(line))
        for _ in range(20):
            f.write(block)
    probe = textwrap.dedent(
        """
        import json, resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "descend", *sys.argv[1:]], capture_output=True, text=True)
        print(json.dumps({"rc": done.returncode, "err": done.stderr[-500:],
                          "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
        """
    )
    peaks = {}
    for path in (small, large):
        args = ["train", "--data", str(path), "--model", "transformer", "--width", "64", "--depth", "2", "--steps",
                "20", "--batch-size", "16", "--threads", "2", "--no-progress", "--out", str(tmp_path / path.stem)]
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=900)
        result = json.loads(out.stdout)
        assert result["rc"] == 0, result["err"]
        peaks[path.stem] = result["peak_mib"]
    print({k: round(v) for k, v in peaks.items()})
    assert peaks["large"] <= peaks["small"] * 1.1 + 20
    config = json.loads((tmp_path / "large" / "config.json").read_text())
    assert config["resolved"]["data_files"][0]["bytes"] == large.stat().st_size
