"""Your own point clouds: write them to an .npz file, train with `descend train`, predict with `descend predict`.

    python examples/point_clouds.py                  # DESCEND_EXAMPLE_QUICK=1: a few steps only

An .npz of point sets holds ``locations [N, P, d]``, optionally ``values [N, P, k]`` (absent: every
point's value is 1) and a boolean ``mask [N, P]`` (False marks padding, for sets of different sizes),
and the targets ``y [N]``. Here: outlines of circles, squares and triangles in 2-D, each turned, scaled
and shifted at random, with 24 to 48 points per outline. `descend train` centres and scales every set
(``--no-normalize-points`` turns that off) and records it, so `descend predict` does the same.
"""

import os
import subprocess
import sys

import numpy as np

QUICK = os.environ.get("DESCEND_EXAMPLE_QUICK") == "1"
SHAPES = ("circle", "square", "triangle")


def outline(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points on the outline of ``shape``, turned, scaled and shifted: ``[n, 2]``."""
    t = rng.uniform(0, 1, n)
    if shape == "circle":
        points = np.stack([np.cos(2 * np.pi * t), np.sin(2 * np.pi * t)], axis=1)
    else:
        corners = 4 if shape == "square" else 3
        angles = 2 * np.pi * np.arange(corners + 1) / corners
        vertices = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        side, frac = np.divmod(t * corners, 1)  # which side, and where along it
        side = side.astype(int)
        points = vertices[side] + frac[:, None] * (vertices[side + 1] - vertices[side])
    turn = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    points = points @ rotation.T * rng.uniform(0.5, 2.0) + rng.uniform(-3, 3, 2)
    return points + rng.normal(0, 0.02, points.shape)


def write_clouds(path: str, count: int, seed: int, with_labels: bool = True) -> list[str]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(24, 49, count)
    labels = rng.integers(0, len(SHAPES), count)
    locations = np.zeros((count, sizes.max(), 2), dtype=np.float32)
    mask = np.zeros((count, sizes.max()), dtype=bool)
    for i, (n, label) in enumerate(zip(sizes, labels)):
        locations[i, :n] = outline(SHAPES[label], n, rng)
        mask[i, :n] = True
    arrays = {"locations": locations, "mask": mask}
    if with_labels:
        arrays["y"] = np.array(SHAPES)[labels]  # class names, or integers
    np.savez(path, **arrays)
    return [SHAPES[label] for label in labels]


def descend(*args: str) -> None:
    print("$ descend", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "descend", *args], check=True)


write_clouds("clouds.npz", 120 if QUICK else 1500, seed=0)
truth = write_clouds("new_clouds.npz", 5, seed=1, with_labels=False)  # new outlines, without labels
descend("train", "--data", "clouds.npz", "--model", "pointset", "--width", "32", "--optimizer", "adamw",
        "--steps", "20" if QUICK else "600", "--lr", "3e-3", "--out", "runs/clouds", "--overwrite", "--no-progress")
descend("predict", "runs/clouds", "--data", "new_clouds.npz", "--out", "clouds_predictions.csv")
print(open("clouds_predictions.csv").read())
print("true shapes:", ", ".join(truth))
