"""Point-set datasets, all generated or loaded offline, each returned as a :class:`DataBundle`.

- :func:`load_digits_points`: scikit-learn's 8x8 digits, each image a set of (pixel location,
  intensity) points with blank pixels dropped (classification, ``input_kind="pointset"``).
- :func:`make_shapes`: 3-D point clouds of 5 solid shapes, randomly rotated, scaled and noised,
  then centred, optionally put in their principal axes and rescaled to unit RMS radius
  (classification, ``input_kind="pointset"``).
- :func:`make_gp1d`: 1-D functions drawn from Gaussian processes, observed at a variable number of
  context points, to be predicted at query points (regression, ``input_kind="pointset-query"``).

Sets of different sizes are padded to the largest one: padded points have zero location and value
and ``mask == False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from descend.data._base import DataBundle, InputKind, Split, Task, seeded_split

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus")


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded random partition of ``range(n)`` into (train, val, test) index tensors.

    The validation and test splits get ``round(fraction * n)`` examples each (at least one when the
    fraction is positive), cut in that order from a seeded permutation (:func:`~descend.data._base.seeded_split`);
    the rest is training data.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name}={f!r}: expected a fraction in [0, 1)")
    try:
        val, test, train = seeded_split(n, (val_fraction, test_fraction), seed)
    except ValueError:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training data out of {n}"
        ) from None
    return train, val, test


def _bundle(name: str, task: Task, input_kind: InputKind, inputs: tuple[Tensor, ...], targets: Tensor,
            out_features: int, location_dim: int, value_dim: int, seed: int, val_fraction: float, test_fraction: float,
            info: dict[str, object]) -> DataBundle:
    everything = Split(inputs, targets)
    train, val, test = split_indices(len(everything), val_fraction, test_fraction, seed)
    return DataBundle(
        name=name,
        task=task,
        input_kind=input_kind,
        train=everything.subset(train),
        val=everything.subset(val),
        test=everything.subset(test),
        out_features=out_features,
        location_dim=location_dim,
        value_dim=value_dim,
        info=info,
    )


def _pad(sets: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """List of ``[n_i, F]`` arrays -> (``[M, max n_i, F]`` zero-padded float32, ``mask [M, max n_i]``)."""
    n_max = max(len(s) for s in sets)
    out = np.zeros((len(sets), n_max, sets[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(sets), n_max), dtype=bool)
    for i, s in enumerate(sets):
        out[i, : len(s)] = s
        mask[i, : len(s)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def load_digits_points(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                       order: str = "random") -> DataBundle:
    """scikit-learn's 1,797 8x8 digit images as point sets, 10 classes.

    Pixel ``(r, c)`` of intensity ``v in {0..16}`` becomes the point with location
    ``((r - 3.5)/3.5, (c - 3.5)/3.5) in [-1, 1]^2`` and value ``v/16 in [0, 1]``; blank pixels are
    dropped, so sets have between about 20 and 64 points. ``order="raster"`` lists the points row by
    row; ``"random"`` in an independent random order per image (seeded). Inputs are
    ``(locations [M, N, 2], values [M, N, 1], mask [M, N])``, targets ``long [M]``.
    """
    if order not in ("random", "raster"):
        raise ValueError(f"order={order!r} is not supported; expected one of ('random', 'raster')")
    from sklearn.datasets import load_digits

    digits = load_digits()
    intensity = torch.as_tensor(digits.images, dtype=torch.float32).reshape(-1, 64) / 16.0  # (M, 64)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    grid = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).sub(3.5).div(3.5)  # (64, 2)
    real = intensity > 0
    if order == "raster":
        key = torch.arange(64.0).expand_as(intensity)
    else:
        key = torch.rand(intensity.shape, generator=torch.Generator().manual_seed(seed + 1))
    key = torch.where(real, key, key + 1e6)  # blanks sort last
    n_max = int(real.sum(dim=1).max())
    idx = key.argsort(dim=1, stable=True)[:, :n_max]  # (M, N)
    mask = real.gather(1, idx)
    locations = grid[idx] * mask[..., None]
    values = (intensity.gather(1, idx) * mask)[..., None]
    return _bundle(
        "digits-points", "classification", "pointset", (locations, values, mask), labels, 10,
        2, 1, seed, val_fraction, test_fraction,
        {"classes": [str(i) for i in range(10)], "order": order, "max_points": n_max},
    )


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (QR of a Gaussian matrix, signs fixed, det = +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _surface(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform on the surface of a unit-sized ``shape``, ``[n, 3]``."""
    u = rng.random((n, 3))
    if shape == "sphere":
        p = rng.standard_normal((n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if shape == "cube":  # half-side 0.8
        face = rng.integers(0, 6, n)
        p = (2 * u - 1) * 0.8
        p[np.arange(n), face % 3] = np.where(face < 3, 0.8, -0.8)
        return p
    if shape == "cylinder":  # radius 0.7, height 1.6; side vs caps by area
        radius, half = 0.7, 0.8
        side = u[:, 0] < (2 * half) / (2 * half + radius)
        theta = 2 * math.pi * u[:, 1]
        rad = np.where(side, radius, radius * np.sqrt(u[:, 2]))
        top = rng.random(n) < 0.5
        z = np.where(side, (2 * u[:, 2] - 1) * half, np.where(top, half, -half))
        return np.stack([rad * np.cos(theta), rad * np.sin(theta), z], axis=1)
    if shape == "cone":  # base radius 0.8 at z=-0.6, apex at z=1.0; side vs base by area
        radius, height = 0.8, 1.6
        slant = math.hypot(radius, height)
        side = u[:, 0] < slant / (slant + radius)
        theta = 2 * math.pi * u[:, 1]
        t = np.sqrt(u[:, 2])  # area grows linearly with distance from the apex
        rad = np.where(side, radius * t, radius * np.sqrt(u[:, 2]))
        z = np.where(side, 1.0 - height * t, 1.0 - height)
        return np.stack([rad * np.cos(theta), rad * np.sin(theta), z], axis=1)
    if shape == "torus":  # major radius 0.75, minor 0.3; rejection on the tube angle for uniform area
        big, small = 0.75, 0.3
        out: list[np.ndarray] = []
        while sum(len(o) for o in out) < n:
            v = 2 * math.pi * rng.random(2 * n)
            keep = rng.random(2 * n) < (big + small * np.cos(v)) / (big + small)
            out.append(v[keep])
        v = np.concatenate(out)[:n]
        theta = 2 * math.pi * rng.random(n)
        ring = big + small * np.cos(v)
        return np.stack([ring * np.cos(theta), ring * np.sin(theta), small * np.sin(v)], axis=1)
    raise ValueError(f"shape={shape!r} is not supported; expected one of {SHAPES}")


def _principal_frame(p: np.ndarray) -> np.ndarray:
    """A centred cloud ``[n, 3]`` in its principal axes: coordinate k along the k-th largest variance
    direction, its sign chosen so the third moment along it is >= 0 (the cone's apex is on +z)."""
    _, vectors = np.linalg.eigh(p.T @ p)  # ascending eigenvalues
    q = p @ vectors[:, ::-1]
    return q * np.where((q**3).sum(axis=0) >= 0, 1.0, -1.0)


def make_shapes(n_per_class: int = 200, points: tuple[int, int] = (64, 160), seed: int = 0, noise: float = 0.02,
                scale: tuple[float, float] = (0.75, 1.25), value: str = "distance", pose: str = "random",
                normalise: bool = False, val_fraction: float = 0.15, test_fraction: float = 0.15) -> DataBundle:
    """3-D point clouds of 5 shapes (sphere, cube, cylinder, cone, torus), one class each.

    Each cloud: ``n ~ U{points[0]..points[1]}`` points uniform on the shape's surface, scaled by
    ``U(scale)``, rotated by a uniformly random rotation, plus ``N(0, noise^2)`` jitter per coordinate,
    then centred on its centroid. ``pose="principal"`` (opt-in) then expresses it in its principal axes
    (largest variance first, each axis signed so the third moment along it is >= 0), the usual
    normalisation of a point cloud's pose: what is left to learn is the shape, with the symmetric
    shapes (sphere, cube) still in arbitrary orientations. ``pose="random"`` (the default) keeps the
    random rotation, which a network must learn to ignore from the data alone. ``normalise=True``
    (opt-in) finally divides the centred cloud by its RMS radius ``sqrt(mean_i |p_i|^2)``, so the random
    scale is drawn but carries no information, as the position does not after centring. The value
    channel is the distance to the centroid (``value="distance"``; in units of the cloud's RMS radius
    when normalised, a rotation- and scale-invariant feature) or 1 (``"constant"``). Inputs
    ``(locations [M, N, 3], values [M, N, 1], mask [M, N])``, targets ``long [M]`` with
    ``M = 5 n_per_class``.
    """
    if value not in ("distance", "constant"):
        raise ValueError(f"value={value!r} is not supported; expected one of ('distance', 'constant')")
    if pose not in ("principal", "random"):
        raise ValueError(f"pose={pose!r} is not supported; expected one of ('principal', 'random')")
    lo, hi = points
    if not 1 <= lo <= hi:
        raise ValueError(f"points={points!r}: expected (min, max) with 1 <= min <= max")
    if n_per_class < 1:
        raise ValueError(f"n_per_class={n_per_class!r}: expected a positive integer")
    rng = np.random.default_rng(seed)
    clouds, vals, labels = [], [], []
    for i in range(n_per_class * len(SHAPES)):
        label = i % len(SHAPES)
        n = int(rng.integers(lo, hi + 1))
        p = _surface(SHAPES[label], n, rng) * rng.uniform(*scale)
        p = p @ _rotation(rng).T + noise * rng.standard_normal((n, 3))
        p = p - p.mean(axis=0)  # centred: the class is in the shape, not in where the cloud sits
        if pose == "principal":
            p = _principal_frame(p)
        if normalise:
            p = p / np.sqrt((p**2).sum(axis=1).mean())
        d = np.linalg.norm(p, axis=1, keepdims=True)
        clouds.append(p)
        vals.append(d if value == "distance" else np.ones_like(d))
        labels.append(label)
    locations, mask = _pad(clouds)
    values, _ = _pad(vals)
    return _bundle(
        "shapes", "classification", "pointset", (locations, values, mask),
        torch.tensor(labels, dtype=torch.long), len(SHAPES), 3, 1, seed, val_fraction, test_fraction,
        {"classes": list(SHAPES), "points": (lo, hi), "value": value, "noise": noise, "pose": pose,
         "normalise": normalise},
    )


def make_gp1d(n_functions: int = 2000, context: tuple[int, int] = (3, 20), queries: int = 16, seed: int = 0,
              length_scale: tuple[float, float] = (0.25, 1.0), noise: float = 0.05,
              x_range: tuple[float, float] = (-2.0, 2.0), val_fraction: float = 0.15,
              test_fraction: float = 0.15) -> DataBundle:
    """1-D regression sets: Gaussian-process draws seen at context points, predicted at query points.

    Per function: ``l ~ logU(length_scale)``; ``x_1..x_{C+Q} ~ U(x_range)`` with ``C = context[1]``;
    ``f ~ N(0, K)``, ``K_ij = exp(-(x_i - x_j)^2 / (2 l^2))``. The first ``n ~ U{context}`` points are
    the context, observed as ``f + N(0, noise^2)`` (the rest of the ``C`` slots are padding); the last
    ``Q = queries`` are the queries, whose targets are the noise-free ``f``. Inputs
    ``(context_locations [M, C, 1], context_values [M, C, 1], context_mask [M, C],
    query_locations [M, Q, 1])``, targets ``[M, Q, 1]``.
    """
    lo, hi = context
    if not 1 <= lo <= hi:
        raise ValueError(f"context={context!r}: expected (min, max) with 1 <= min <= max")
    if queries < 1 or n_functions < 1:
        raise ValueError(f"queries={queries!r} and n_functions={n_functions!r} must be positive integers")
    g = torch.Generator().manual_seed(seed)
    total = hi + queries
    a, b = x_range
    x = a + (b - a) * torch.rand(n_functions, total, generator=g, dtype=torch.float64)
    log_lo, log_hi = math.log(length_scale[0]), math.log(length_scale[1])
    ell = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n_functions, 1, 1, generator=g, dtype=torch.float64))
    cov = torch.exp(-((x[:, :, None] - x[:, None, :]) ** 2) / (2 * ell**2))
    cov = cov + 1e-6 * torch.eye(total, dtype=torch.float64)
    f = (torch.linalg.cholesky(cov) @ torch.randn(n_functions, total, 1, generator=g, dtype=torch.float64))
    n_context = torch.randint(lo, hi + 1, (n_functions, 1), generator=g)
    mask = torch.arange(hi)[None, :] < n_context  # (M, C)
    observed = f[:, :hi] + noise * torch.randn(n_functions, hi, 1, generator=g, dtype=torch.float64)
    context_locations = (x[:, :hi, None] * mask[..., None]).float()
    context_values = (observed * mask[..., None]).float()
    query_locations = x[:, hi:, None].float()
    targets = f[:, hi:].float()
    return _bundle(
        "gp1d", "regression", "pointset-query",
        (context_locations, context_values, mask, query_locations), targets,
        1, 1, 1, seed, val_fraction, test_fraction,
        {"length_scale": length_scale, "noise": noise, "context": (lo, hi), "queries": queries},
    )


def nearest_context_value(context_locations: Tensor, context_values: Tensor, context_mask: Tensor | None,
                          query_locations: Tensor) -> Tensor:
    """The nearest-neighbour baseline: each query gets the value of its nearest real context point.

    ``[B, N, d], [B, N, v], [B, N], [B, Q, d] -> [B, Q, v]`` (Euclidean distance; padded points are
    never chosen).
    """
    dist = torch.cdist(query_locations, context_locations)  # (B, Q, N)
    if context_mask is not None:
        dist = dist.masked_fill(~context_mask[:, None, :], float("inf"))
    nearest = dist.argmin(dim=-1)  # (B, Q)
    return context_values.gather(1, nearest[..., None].expand(-1, -1, context_values.shape[-1]))



def normalize_point_sets(locations: Tensor, mask: Tensor) -> Tensor:
    """Each set centred on the mean of its real points and scaled to unit RMS radius.

    ``locations [M, N, d]``, ``mask [M, N]`` (bool) -> ``[M, N, d]`` with, per set ``m`` over its real
    points ``i``: ``p_i <- (p_i - c) / r``, ``c = mean_i p_i``, ``r = sqrt(mean_i |p_i - c|^2)`` (``r = 1``
    for a set of one point or of identical points). Padded points stay at zero. This removes a set's
    position and size, as :func:`make_shapes` does with ``normalise=True``.
    """
    weight = mask.to(locations.dtype)[..., None]  # (M, N, 1)
    count = weight.sum(dim=1, keepdim=True).clamp_min(1.0)  # (M, 1, 1)
    centre = (locations * weight).sum(dim=1, keepdim=True) / count
    centred = (locations - centre) * weight
    radius = (centred.square().sum(dim=-1, keepdim=True).sum(dim=1, keepdim=True) / count).sqrt()
    radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    return centred / radius


#: Arrays a point-set ``.npz`` may hold (``locations`` or a 3-D ``X`` is required; ``y`` for training).
POINT_ARRAYS = ("locations", "values", "mask", "y")


def point_arrays(archive: dict[str, np.ndarray], name: str, *, need_y: bool = True) -> dict[str, np.ndarray]:
    """Validated point-set arrays from an ``.npz``'s arrays: ``locations [N, P, d]`` (or ``X [N, P, d]``),
    ``values [N, P, k]`` (default: ones, ``k = 1``), ``mask [N, P]`` bool (default: all real) and ``y [N]``
    or ``[N, K]``. Raises ``ValueError`` with a one-line message on a wrong name, shape, dtype or value."""
    if "locations" in archive:
        locations = archive["locations"]
    elif "X" in archive and archive["X"].ndim == 3:
        locations = archive["X"]
    else:
        raise ValueError(f"{name}: a point-set archive needs an array 'locations' [N, P, d] (or a 3-D 'X')")
    if locations.ndim != 3 or 0 in locations.shape:
        raise ValueError(f"{name}: locations must have shape [N sets, P points, d coordinates], got {locations.shape}")
    n, p, _ = locations.shape
    values = archive.get("values")
    if values is None:
        values = np.ones((n, p, 1), dtype=np.float32)
    elif values.ndim == 2:
        values = values[..., None]
    if values.ndim != 3 or values.shape[:2] != (n, p):
        raise ValueError(f"{name}: values must have shape [{n}, {p}, k] like locations, got {values.shape}")
    mask = archive.get("mask")
    if mask is None:
        mask = np.ones((n, p), dtype=bool)
    if mask.shape != (n, p) or mask.dtype.kind not in "bui":
        raise ValueError(f"{name}: mask must be a boolean array of shape [{n}, {p}], got {mask.dtype} {mask.shape}")
    mask = mask.astype(bool)
    if not mask.any(axis=1).all():
        raise ValueError(f"{name}: set {int(np.argmin(mask.any(axis=1)))} has no real point (its mask is all false)")
    for key, array in (("locations", locations), ("values", values)):
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{name}: {key} must be numeric, got dtype {array.dtype}")
        real = array[mask]
        bad = ~np.isfinite(real.astype(np.float64)) | (np.abs(real.astype(np.float64)) > 3e38)
        if bad.any():
            raise ValueError(f"{name}: {key} holds {int(bad.sum())} NaN/inf or out-of-range value(s) at real points")
    out = {"locations": locations, "values": values, "mask": mask}
    if need_y:
        if "y" not in archive:
            raise ValueError(f"{name}: the archive lacks 'y' (one label or target per set)")
        y = archive["y"]
        if y.ndim not in (1, 2) or y.shape[0] != n:
            raise ValueError(f"{name}: y must have shape [{n}] or [{n}, K], got {y.shape}")
        out["y"] = y
    return out


def load_point_npz(path: str | Path, *, task: Task | None = None, seed: int = 0, normalize: bool = True,
                   val_fraction: float = 0.15, test_fraction: float = 0.15) -> DataBundle:
    """Point sets from an ``.npz`` archive (read without pickle): see :func:`point_arrays` for the arrays.

    Each set is centred and scaled by :func:`normalize_point_sets` unless ``normalize=False``
    (``info["normalize_points"]`` records it, for prediction). Labels ``y [N]``: the task is inferred as
    for tables (classes for strings or few distinct integers; ``task`` overrides it); regression targets are
    standardised with the training sets' mean and std (``info["target_mean"]``, ``info["target_std"]``).
    Splits: a seeded permutation (:func:`split_indices`).
    """
    from descend.data.tabular import DataError, infer_task

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = point_arrays({k: archive[k] for k in archive.files}, path.name)
    except ValueError as e:
        raise DataError(str(e)) from None
    y = arrays["y"]
    task = task or infer_task(y)
    locations = torch.as_tensor(arrays["locations"], dtype=torch.float32)
    values = torch.as_tensor(arrays["values"], dtype=torch.float32)
    mask = torch.as_tensor(arrays["mask"])
    if normalize:
        locations = normalize_point_sets(locations, mask)
    values = values * mask[..., None]
    info: dict[str, object] = {"normalize_points": normalize, "max_points": int(locations.shape[1]), "sets": len(y)}
    train, val, test = split_indices(len(y), val_fraction, test_fraction, seed)
    if task == "classification":
        if y.ndim != 1:
            raise DataError(f"{path.name}: classification needs one label per set, got y of shape {y.shape}")
        classes, index = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise DataError(f"{path.name}: classification needs at least 2 classes, y has {len(classes)}")
        info["classes"] = [c.item() if hasattr(c, "item") else c for c in classes]
        targets = torch.as_tensor(index.reshape(-1), dtype=torch.long)
        out_features = len(classes)
    else:
        if y.dtype.kind not in "biuf" or not np.isfinite(y.astype(np.float64)).all():
            raise DataError(f"{path.name}: a regression target y must be finite numbers; use --task classification")
        t = torch.as_tensor(y.astype(np.float64).reshape(len(y), -1))
        mean, std = t[train].mean(0), t[train].std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        targets = ((t - mean) / std).float()
        info["target_mean"], info["target_std"] = mean.tolist(), std.tolist()
        out_features = int(t.shape[1])
    everything = Split((locations, values, mask), targets)
    return DataBundle(
        name=path.stem,
        task=task,  # type: ignore[arg-type]
        input_kind="pointset",
        train=everything.subset(train),
        val=everything.subset(val),
        test=everything.subset(test),
        out_features=out_features,
        location_dim=int(locations.shape[2]),
        value_dim=int(values.shape[2]),
        info=info,
    )

__all__ = [
    "POINT_ARRAYS",
    "SHAPES",
    "load_digits_points",
    "load_point_npz",
    "make_gp1d",
    "make_shapes",
    "nearest_context_value",
    "normalize_point_sets",
    "point_arrays",
    "split_indices",
]
