"""Own point sets from an .npz file: the arrays, the per-set normalisation, training and prediction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from descend.cli import main
from descend.data.points import normalize_point_sets
from descend.data.registry import load_data


def outlines(n_sets: int = 600, points: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2-D outlines of a circle, a square and a triangle (label 0, 1, 2), each uniformly random in
    rotation, scaled by U(0.5, 2), shifted by N(0, 3²) per axis and jittered by N(0, 0.02²):
    ``locations [n_sets, points, 2]``, ``y [n_sets]``."""
    rng = np.random.default_rng(seed)
    square = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], float) / math.sqrt(2)
    triangle = np.array([[math.cos(a), math.sin(a)] for a in (0.5 * math.pi, 7 / 6 * math.pi, 11 / 6 * math.pi)])
    corners = {1: square, 2: triangle}
    sets, labels = [], []
    for i in range(n_sets):
        label = i % 3
        t = rng.random(points)
        if label == 0:
            p = np.stack([np.cos(2 * math.pi * t), np.sin(2 * math.pi * t)], axis=1)
        else:
            c = corners[label]
            edge = (t * len(c)).astype(int)
            frac = (t * len(c) - edge)[:, None]
            p = c[edge] * (1 - frac) + c[(edge + 1) % len(c)] * frac
        angle = rng.uniform(0, 2 * math.pi)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        p = (p @ rotation.T) * rng.uniform(0.5, 2.0) + rng.normal(0, 3.0, size=2) + rng.normal(0, 0.02, p.shape)
        sets.append(p)
        labels.append(label)
    return np.stack(sets).astype(np.float32), np.array(labels)


def test_normalisation_centres_and_scales_each_set_ignoring_padding() -> None:
    g = torch.Generator().manual_seed(0)
    locations = torch.randn(4, 6, 3, generator=g) * 5 + 7
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    locations[1, 4:] = 1e3  # padding must not move the centre or the scale
    out = normalize_point_sets(locations, mask)
    for m in range(4):
        real = out[m][mask[m]]
        torch.testing.assert_close(real.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        assert real.square().sum(-1).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(out[1, 4:] == 0)
    # invariant to a shift and a scale of the set, as the definition says
    torch.testing.assert_close(normalize_point_sets(locations * 3 - 2, mask)[0], out[0], atol=1e-5, rtol=1e-5)


def test_arrays_locations_values_mask_and_a_3d_x(tmp_path) -> None:
    locations, y = outlines(30, 10)
    mask = np.ones(locations.shape[:2], dtype=bool)
    mask[0, 5:] = False
    values = np.abs(locations[..., :1])
    np.savez(tmp_path / "full.npz", locations=locations, values=values, mask=mask, y=y)
    np.savez(tmp_path / "x3d.npz", X=locations, y=y)
    full = load_data(str(tmp_path / "full.npz"))
    assert (full.input_kind, full.location_dim, full.value_dim, full.out_features) == ("pointset", 2, 1, 3)
    assert full.info["normalize_points"] is True
    bare = load_data(str(tmp_path / "x3d.npz"), normalize_points=False)
    everything = torch.cat([bare.train.inputs[1], bare.val.inputs[1], bare.test.inputs[1]])
    assert torch.all(everything == 1.0)  # values absent: each point's value is 1
    raw = torch.cat([bare.train.inputs[0], bare.val.inputs[0], bare.test.inputs[0]])
    assert sorted(raw.flatten().tolist()) == sorted(torch.from_numpy(locations).flatten().tolist())


def test_bad_point_archives_are_one_line_exit_2(tmp_path, capsys) -> None:
    locations, y = outlines(12, 5)
    cases = {
        "values.npz": {"locations": locations, "values": np.ones((12, 4, 1)), "y": y},
        "mask.npz": {"locations": locations, "mask": np.ones((12, 5), dtype=np.float32) * 0.5, "y": y},
        "empty.npz": {"locations": locations, "mask": np.zeros((12, 5), dtype=bool), "y": y},
        "nan.npz": {"locations": np.where(locations > 1, np.nan, locations), "y": y},
        "noy.npz": {"locations": locations},
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        code = main(["train", "--data", str(tmp_path / name), "--model", "pointset", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and name in err[0], (name, err)


def test_train_and_predict_a_point_set_file(tmp_path) -> None:
    locations, y = outlines(90, 12)
    names = np.array(["circle", "square", "triangle"])[y]
    np.savez(tmp_path / "c.npz", locations=locations, y=names)
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "c.npz"), "--model", "pointset", "--width", "16", "--depth", "1",
            "--steps", "5", "--threads", "1", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    record = json.loads((run / "preprocessing.json").read_text())
    assert record["normalize_points"] is True and record["classes"] == ["circle", "square", "triangle"]
    np.savez(tmp_path / "new.npz", locations=locations[:7])
    assert main(["predict", str(run), "--data", str(tmp_path / "new.npz"), "--out", str(tmp_path / "p.csv")]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "row,prediction,p_circle,p_square,p_triangle" and len(lines) == 8
    np.savez(tmp_path / "3d.npz", locations=np.zeros((2, 4, 3)))
    assert main(["predict", str(run), "--data", str(tmp_path / "3d.npz"), "--out", str(tmp_path / "q.csv")]) == 2


def test_predict_refuses_a_file_without_the_values_or_mask_the_model_was_trained_with(tmp_path, capsys) -> None:
    locations, y = outlines(60, 12)
    rng = np.random.default_rng(0)
    values = rng.uniform(0.5, 2.0, size=(60, 12, 1)).astype(np.float32)
    mask = np.ones((60, 12), dtype=bool)
    mask[::2, 9:] = False  # every other set has 9 real points and 3 of padding
    np.savez(tmp_path / "full.npz", locations=locations, values=values, mask=mask, y=y)
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "full.npz"), "--model", "pointset", "--width", "8", "--depth", "1",
            "--steps", "2", "--threads", "1", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    assert json.loads((run / "preprocessing.json").read_text())["point_arrays"] == ["locations", "values", "mask"]
    capsys.readouterr()
    for given, missing in (({}, "values and mask"), ({"values": values}, "mask"), ({"mask": mask}, "values")):
        np.savez(tmp_path / "part.npz", locations=locations, **given)
        assert main(["predict", str(run), "--data", str(tmp_path / "part.npz"), "--out", str(tmp_path / "p.csv")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"part.npz: lacks {missing}, which the model was trained with" in err[0], err
    assert not (tmp_path / "p.csv").exists()
    np.savez(tmp_path / "all.npz", locations=locations, values=values, mask=mask)
    assert main(["predict", str(run), "--data", str(tmp_path / "all.npz"), "--out", str(tmp_path / "p.csv")]) == 0


#: The measured configuration: a small PointSetTransformer, so that 6 runs take minutes on a CPU.
MEASURE_ARGS = ("--width", "32", "--depth", "2", "--steps", "400", "--threads", "1")


def measure(tmp: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, list[float]]:
    """Test accuracy of `descend train --model pointset` (:data:`MEASURE_ARGS`) on :func:`outlines`
    (600 x 48), with and without per-set normalisation, one data draw, split and initialisation per seed."""
    results: dict[str, list[float]] = {"normalised": [], "raw": []}
    for seed in seeds:
        locations, y = outlines(600, 48, seed=seed)
        np.savez(tmp / f"clouds{seed}.npz", locations=locations, y=y)
        for key, flag in (("normalised", "--normalize-points"), ("raw", "--no-normalize-points")):
            out = tmp / f"{key}{seed}"
            args = ["train", "--data", str(tmp / f"clouds{seed}.npz"), "--model", "pointset", flag,
                    "--seed", str(seed), *MEASURE_ARGS, "--no-progress", "--out", str(out)]  # fmt: skip
            assert main(args) == 0
            results[key].append(json.loads((out / "summary.json").read_text())["test"]["accuracy"])
    return results


@pytest.mark.slow
def test_normalisation_is_what_makes_posed_outlines_learnable(tmp_path) -> None:
    results = measure(tmp_path)
    print(f"pointset on 2-D outlines (600 x 48), test accuracy per seed: {results}")
    assert min(results["normalised"]) >= 0.7  # measured 74.4%, 92.2%, 94.4% (docs/guide/cli.md)
    assert np.mean(results["normalised"]) >= np.mean(results["raw"]) + 0.2
