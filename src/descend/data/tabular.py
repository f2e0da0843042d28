"""Tabular datasets: scikit-learn's bundled digits, CSV files and ``.npz`` arrays.

Every loader returns a :class:`~descend.data._base.DataBundle` with one input ``X [M, F]``
(float32) and targets ``y [M]`` (int64 class indices, classification) or ``y [M, K]`` (float32,
regression). The rows are split train/val/test by a seeded permutation and the features are
standardised with the mean and standard deviation of the *training* rows only:

    x' = (x - mean_train) / std_train        (std_train = 1 where a feature is constant)

Regression targets are standardised the same way (``info["target_mean"]``, ``info["target_std"]``
hold the scale, so ``y = y' * std + mean``). Bad input raises :class:`DataError`, whose message
says what is wrong and how to fix it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from descend.data._base import DataBundle, Split, Task

__all__ = ["DEFAULT_FRACTIONS", "DataError", "from_arrays", "infer_task", "load_csv", "load_digits", "load_npz"]

#: Default (train, val) fractions of the rows; the test split gets the rest (0.2).
DEFAULT_FRACTIONS = (0.7, 0.1)

#: A numeric target with at most this many distinct integer values is read as class labels.
MAX_INFERRED_CLASSES = 20


class DataError(ValueError):
    """The data cannot be used as given; the message says why and what to do."""


def infer_task(y: np.ndarray) -> Task:
    """``"classification"`` for string labels or few distinct integers, else ``"regression"``."""
    if y.dtype.kind in "OUSb":
        return "classification"
    if y.ndim > 1 and y.shape[1] > 1:
        return "regression"
    values = np.unique(y)
    integral = bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))
    return "classification" if integral and len(values) <= MAX_INFERRED_CLASSES else "regression"


def _split_index(m: int, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded permutation of ``range(m)`` cut into train/val/test by ``fractions`` (train, val)."""
    f_train, f_val = fractions
    if not (0 < f_train < 1 and 0 < f_val < 1 and f_train + f_val < 1):
        raise DataError(f"split fractions must be in (0, 1) with train + val < 1, got train={f_train}, val={f_val}")
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed)).numpy()
    n_train = max(1, round(f_train * m))
    n_val = max(1, round(f_val * m))
    if n_train + n_val >= m:
        raise DataError(f"{m} rows are too few to split into non-empty train/val/test; provide at least 3 rows")
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def from_arrays(
    X: np.ndarray,
    y: np.ndarray,
    *,
    name: str,
    task: Task | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    feature_names: Sequence[str] | None = None,
    standardize: bool = True,
) -> DataBundle:
    """Validate ``X [M, F]`` and ``y [M]`` (or ``[M, K]``), split, standardise and bundle them."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise DataError(f"{name}: features must be a 2-D array [rows, features], got shape {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{name}: the data is empty (shape {tuple(X.shape)}); provide at least 3 rows and 1 feature")
    if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
        raise DataError(f"{name}: targets must have shape [{X.shape[0]}] or [{X.shape[0]}, K], got {tuple(y.shape)}")
    if X.dtype.kind not in "biuf":
        raise DataError(f"{name}: features must be numeric, got dtype {X.dtype}; encode or drop non-numeric columns")
    X = X.astype(np.float64)
    bad = ~np.isfinite(X)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        col_name = feature_names[col] if feature_names is not None else f"feature {col}"
        raise DataError(
            f"{name}: {int(bad.sum())} NaN/inf value(s) in the features (first at row {row}, column {col_name!r}); "
            "remove or impute them"
        )
    task = task or infer_task(y)
    if task not in ("classification", "regression"):
        raise DataError(f"task must be 'classification' or 'regression', got {task!r}")
    info: dict[str, object] = {"rows": int(X.shape[0]), "features": int(X.shape[1])}
    if feature_names is not None:
        info["feature_names"] = list(feature_names)
    if task == "classification":
        if y.ndim != 1:
            raise DataError(f"{name}: classification needs one target column, got shape {tuple(y.shape)}")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise DataError(f"{name}: NaN/inf in the target; remove those rows")
        classes, y_index = np.unique(y, return_inverse=True)
        info["classes"] = [c.item() if hasattr(c, "item") else c for c in classes]
        targets = torch.as_tensor(y_index.reshape(-1), dtype=torch.int64)
        out_features = len(classes)
        if out_features < 2:
            raise DataError(f"{name}: classification needs at least 2 classes, the target has {out_features}")
    else:
        if y.dtype.kind not in "biuf":
            raise DataError(
                f"{name}: a regression target must be numeric, got dtype {y.dtype}; use --task classification"
            )
        y = y.astype(np.float64).reshape(len(y), -1)
        if not np.all(np.isfinite(y)):
            raise DataError(f"{name}: NaN/inf in the target; remove those rows")
        targets = torch.as_tensor(y, dtype=torch.float64)
        out_features = int(y.shape[1])

    i_train, i_val, i_test = _split_index(X.shape[0], fractions, seed)
    features = torch.as_tensor(X, dtype=torch.float64)
    if standardize:
        mean = features[i_train].mean(0)
        std = features[i_train].std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        features = (features - mean) / std
        if task == "regression":
            t_mean = targets[i_train].mean(0)
            t_std = targets[i_train].std(0, unbiased=False)
            t_std = torch.where(t_std > 0, t_std, torch.ones_like(t_std))
            targets = (targets - t_mean) / t_std
            info["target_mean"], info["target_std"] = t_mean.tolist(), t_std.tolist()
    features = features.float()
    if task == "regression":
        targets = targets.float()

    def split(index: np.ndarray) -> Split:
        i = torch.as_tensor(index)
        return Split((features[i].contiguous(),), targets[i].contiguous())

    return DataBundle(
        name=name,
        task=task,
        input_kind="vector",
        train=split(i_train),
        val=split(i_val),
        test=split(i_test),
        out_features=out_features,
        in_features=int(X.shape[1]),
        info=info,
    )


def load_digits(seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> DataBundle:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, 64 features, 10 classes; offline)."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    return from_arrays(d.data, d.target, name="digits", task="classification", seed=seed, fractions=fractions)


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load_csv(
    path: str | Path,
    target: str | None,
    *,
    task: Task | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> DataBundle:
    """A CSV file with a header row; ``target`` names the label column, all other columns are features.

    Every feature must be numeric and finite. The task is inferred from the target column
    (see :func:`infer_task`) unless ``task`` is given.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; check the path")
    if target is None:
        raise DataError(f"{path.name}: a CSV needs --target COLUMN naming the label column")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{path.name}: the file is empty; it needs a header row and at least 3 data rows")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if target not in header:
        raise DataError(f"{path.name}: no column {target!r}; the columns are {', '.join(header)}")
    if not body:
        raise DataError(f"{path.name}: the file has a header but no data rows")
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise DataError(f"{path.name}: row {i + 2} has {len(r)} fields, the header has {len(header)}")
    t = header.index(target)
    feature_names = [h for j, h in enumerate(header) if j != t]
    X = np.empty((len(body), len(feature_names)))
    for j_out, j in enumerate(j for j in range(len(header)) if j != t):
        for i, r in enumerate(body):
            v = _parse_float(r[j])
            if v is None:
                raise DataError(
                    f"{path.name}: column {header[j]!r} is not numeric (row {i + 2}: {r[j]!r}); "
                    "features must be numbers: encode or drop that column"
                )
            if not math.isfinite(v):
                raise DataError(f"{path.name}: column {header[j]!r} holds {r[j]!r} at row {i + 2}; remove or impute it")
            X[i, j_out] = v
    labels = [r[t].strip() for r in body]
    if any(label == "" for label in labels):
        row = labels.index("") + 2
        raise DataError(f"{path.name}: the target column {target!r} is empty at row {row}; remove that row")
    numeric = [_parse_float(v) for v in labels]
    y = np.array(labels, dtype=object) if any(v is None for v in numeric) else np.array(numeric, dtype=np.float64)
    if y.dtype == object:
        y = y.astype(str)
    return from_arrays(X, y, name=path.stem, task=task, seed=seed, fractions=fractions, feature_names=feature_names)


def load_npz(
    path: str | Path, *, task: Task | None = None, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> DataBundle:
    """An ``.npz`` archive holding ``X [M, F]`` and ``y [M]`` (no pickled objects are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path.name}: the archive lacks {' and '.join(missing)}; it holds {archive.files or 'nothing'} "
                    "and needs arrays named X and y"
                )
            X, y = archive["X"], archive["y"]
    except DataError:
        raise
    except Exception as e:  # zipfile/pickle errors: not a usable npz
        raise DataError(f"{path.name}: cannot read it as an .npz archive ({e})") from e
    return from_arrays(X, y, name=path.stem, task=task, seed=seed, fractions=fractions)
