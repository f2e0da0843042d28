"""The shared helpers: the atomic writer, seeding, and the lr tuner with its seed statistics."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch

from descend._io import atomic_path, atomic_write, write_json
from descend._random import generator, seed_everything
from descend.compare._tuning import log_grid, seed_stats, t_quantile, tune_lr


def test_atomic_write_uses_the_umask_and_leaves_no_temporary(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a.json", {"x": 1.5})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"x": 1.5}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write(tmp_path / "f.txt", "old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    with atomic_path(tmp_path / "t.bin", suffix=".bin") as tmp:
        assert tmp.name.endswith(".bin.tmp")
        tmp.write_bytes(b"abc")
    assert (tmp_path / "t.bin").read_bytes() == b"abc"


def test_seed_everything_and_generator_are_reproducible():
    seed_everything(3)
    a = torch.randn(4)
    seed_everything(3)
    assert torch.equal(a, torch.randn(4))
    assert torch.equal(torch.rand(3, generator=generator(5)), torch.rand(3, generator=generator(5)))


def test_t_interval_matches_the_closed_form():
    s = seed_stats([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.median == 2.0
    assert s.half_width == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert seed_stats([5.0]).half_width == 0.0
    assert t_quantile(1000) == 1.960
    assert not seed_stats([0.0, 0.1]).overlaps(seed_stats([10.0, 10.1]))


def test_log_grid():
    assert log_grid(1e-3, 1e-1, per_decade=1) == [1e-3, 1e-2, 1e-1]
    assert log_grid(0.01, 1, per_decade=2) == [0.01, 0.0316, 0.1, 0.316, 1.0]


def test_tune_lr_extends_the_grid_until_the_optimum_is_inside():
    calls = []

    def run(lr, seed):  # a bowl in log(lr) with its bottom at 1e-4, far below the grid
        calls.append((lr, seed))
        return (math.log10(lr) + 4) ** 2 + 0.01 * seed

    result = tune_lr(run, [1e-2, 1e-1, 1.0], seeds=[0, 1], max_extensions=5)
    assert result.best_lr == pytest.approx(1e-4)
    assert not result.at_edge and result.extended == 3
    assert result.runs == len(calls) == 2 * 6


def test_tune_lr_counts_a_diverged_seed_as_the_worst():
    def run(lr, seed):
        if lr == 1.0 and seed == 1:
            return float("nan")
        return 1.0 / lr  # larger is better, except that 1.0 diverges on one seed

    result = tune_lr(run, [0.01, 0.1, 1.0], seeds=[0, 1], max_extensions=0)
    assert result.best_lr == 0.1 and result.scores[1.0][1] == math.inf
    assert result.at_edge is False


def test_tune_lr_reports_an_edge_it_could_not_leave():
    result = tune_lr(lambda lr, seed: -lr, [0.1, 1.0], max_extensions=2)
    assert result.at_edge and result.extended == 2 and result.best_lr == pytest.approx(100.0)
