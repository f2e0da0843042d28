"""Tabular datasets: scikit-learn's bundled digits, CSV files and ``.npz`` arrays.

Every loader returns a :class:`~descend.data._base.DataBundle` with one input ``X [M, F]``
(float32) and targets ``y [M]`` (int64 class indices, classification) or ``y [M, K]`` (float32,
regression). The rows are split train/val/test by a seeded permutation and the features are
standardised with the mean and standard deviation of the *training* rows only:

    x' = (x - mean_train) / std_train        (std_train = 1 where a feature is constant)

Regression targets are standardised the same way (``info["target_mean"]``, ``info["target_std"]``
hold the scale, so ``y = y' * std + mean``). Bad input raises :class:`DataError`, whose message
says what is wrong and how to fix it: undecodable bytes (by offset), duplicate column names,
and any NaN, infinite or out-of-range value (by row and column).

**Which task.** ``task="classification"`` or ``"regression"`` is used as given. Otherwise
(:func:`infer_task`): text labels are classes; an integer-valued target with ``k`` distinct
values over ``n`` rows is classification when ``k <= 2`` or ``k * MIN_ROWS_PER_CLASS <= n``
(at least 5 rows per class on average), else regression; fractional or multi-column targets,
and integers beyond ±2**31, are regression. So 1,000 integer classes over 5,000 rows are
classes, and a 20-row table of integer body weights (17 distinct values) is regression. The
bundle records the choice and why in ``info["task_source"]`` (``"given"`` or ``"inferred"``)
and ``info["task_reason"]``.

**Missing values.** An empty cell (or ``NA``, ``N/A``, ``NaN``, ``null``, ``none``) of a CSV feature
column, and a NaN in an ``.npz``'s ``X``, is a missing value. ``missing="error"`` (the default)
refuses it, naming the line and column; ``"drop"`` drops every row with a missing feature or
target before the split (``info["rows_dropped"]``); ``"mean"`` fills each missing feature with its
column's mean over the *training* rows (``info["feature_fill"]``, what ``descend predict`` fills new
rows with), a missing target still being an error.

**Which values.** Every feature (and regression target) must be finite and within float32's
range, ``|x| <= 3.4e38``, since the model computes in float32; then the float64 mean and
variance cannot overflow (``n * 3.4e38`` and ``(3.4e38)**2`` are far below float64's 1.8e308).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from descend.data._base import DataBundle, Split, Task, seeded_split

__all__ = ["DEFAULT_FRACTIONS", "DataError", "from_arrays", "infer_task", "load_csv", "load_digits", "load_npz"]

#: Default (train, val) fractions of the rows; the test split gets the rest (0.2).
DEFAULT_FRACTIONS = (0.7, 0.1)

#: An integer-valued target is read as class labels when its classes average at least this many rows.
MIN_ROWS_PER_CLASS = 5

#: The largest magnitude a feature or regression target may have (float32's largest finite value).
MAX_ABS_VALUE = float(np.finfo(np.float32).max)

#: CSV cells (compared lower-cased, stripped) that mean "no value": a missing value, not a bad one.
MISSING_CELLS = frozenset({"", "na", "n/a", "nan", "null", "none"})

#: What a missing value advises, after what is wrong.
MISSING_HINT = "fill it in, or pass --missing drop (drop such rows) or --missing mean (fill the training mean)"

#: Delimiters :func:`load_csv` tries when none is given.
DELIMITERS = (",", ";", "\t")


class DataError(ValueError):
    """The data cannot be used as given; the message says why and what to do."""


def infer_task(y: np.ndarray) -> Task:
    """The task a target ``y [M]`` (or ``[M, K]``) implies; the rule is in the module docstring."""
    return _infer_task(np.asarray(y))[0]


def _infer_task(y: np.ndarray) -> tuple[Task, str]:
    """``(task, reason)`` for a target; ``reason`` says in a few words why."""
    if y.dtype.kind in "OUSb":
        return "classification", "the target holds labels, not numbers"
    if y.ndim > 1 and y.shape[1] > 1:
        return "regression", f"the target has {y.shape[1]} columns"
    values = np.unique(y)
    if not (np.all(np.abs(values) < 2**31) and np.all(values == np.round(values))):
        return "regression", "the target holds fractional, huge or non-finite values"
    k, n = len(values), len(y)
    if k <= 2 or k * MIN_ROWS_PER_CLASS <= n:
        return "classification", f"{k} distinct integer values over {n} rows (at least {MIN_ROWS_PER_CLASS} per class)"
    return "regression", f"{k} distinct integer values over {n} rows (fewer than {MIN_ROWS_PER_CLASS} per class)"


def _bad_value(v: float) -> str | None:
    """Why the number ``v`` cannot be used as a feature or regression target (None: it can)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "infinite"
    if abs(v) > MAX_ABS_VALUE:
        return "beyond float32's range (|x| <= 3.4e38)"
    return None


def _check_values(a: np.ndarray, name: str, what: str, columns: Sequence[str] | None = None) -> None:
    """DataError naming the first NaN, infinite or out-of-range entry of the 2-D float array ``a``."""
    bad = ~np.isfinite(a) | (np.abs(np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)) > MAX_ABS_VALUE)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        column = repr(columns[col]) if columns is not None else str(col)
        raise DataError(
            f"{name}: {what} column {column} at row {row} (counting from 0) is {float(a[row, col])!r}, "
            f"{_bad_value(float(a[row, col]))} ({int(bad.sum())} such value(s)); remove, impute or rescale them"
        )


def _split_index(m: int, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test row indices: :func:`~descend.data._base.seeded_split` by ``fractions`` (train, val)."""
    f_train, f_val = fractions
    if not (0 < f_train < 1 and 0 < f_val < 1 and f_train + f_val < 1):
        raise DataError(f"split fractions must be in (0, 1) with train + val < 1, got train={f_train}, val={f_val}")
    try:
        train, val, test = seeded_split(m, (f_train, f_val), seed)
    except ValueError:
        raise DataError(f"{m} rows are too few to split into non-empty train/val/test; provide more rows") from None
    return train.numpy(), val.numpy(), test.numpy()


def from_arrays(X: np.ndarray, y: np.ndarray, *, name: str, task: Task | None = None, seed: int = 0,
                fractions: Sequence[float] = DEFAULT_FRACTIONS, feature_names: Sequence[str] | None = None,
                standardize: bool = True, missing: str = "error", rows_dropped: int = 0) -> DataBundle:
    """Validate ``X [M, F]`` and ``y [M]`` (or ``[M, K]``), split, standardise and bundle them.

    NaN features are missing values, handled as ``missing`` says (see the module docstring);
    ``rows_dropped`` counts rows a reader already dropped (e.g. for a missing target)."""
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
    if feature_names is not None and len(feature_names) != X.shape[1]:
        raise DataError(f"{name}: {len(feature_names)} feature names for {X.shape[1]} feature columns")
    if missing not in ("error", "drop", "mean"):
        raise DataError(f"missing must be 'error', 'drop' or 'mean', got {missing!r}")
    X = X.astype(np.float64)
    absent = np.isnan(X)
    if absent.any() and missing == "drop":
        keep = ~absent.any(axis=1)
        if y.dtype.kind == "f":
            keep &= np.isfinite(y.reshape(len(y), -1)).all(axis=1)
        rows_dropped += int((~keep).sum())
        X, y, absent = X[keep], y[keep], absent[keep]
        if X.shape[0] == 0:
            raise DataError(f"{name}: every row has a missing value; --missing mean fills them instead")
    if absent.any() and missing == "error":
        row, col = (int(i) for i in np.argwhere(absent)[0])
        column = repr(feature_names[col]) if feature_names is not None else str(col)
        raise DataError(
            f"{name}: feature column {column} at row {row} (counting from 0) is missing (NaN; "
            f"{int(absent.sum())} such value(s)); {MISSING_HINT}"
        )
    _check_values(np.where(absent, 0.0, X), name, "feature", feature_names)
    if task is None:
        task, reason = _infer_task(y)
        source = "inferred"
    else:
        reason, source = "given", "given"
    if task not in ("classification", "regression"):
        raise DataError(f"task must be 'classification' or 'regression', got {task!r}")
    info: dict[str, object] = {
        "rows": int(X.shape[0]),
        "features": int(X.shape[1]),
        "task_source": source,
        "task_reason": reason,
        "missing": missing,
    }
    if rows_dropped:
        info["rows_dropped"] = rows_dropped
    if feature_names is not None:
        info["feature_names"] = list(feature_names)
    if task == "classification":
        if y.ndim != 1:
            raise DataError(f"{name}: classification needs one target column, got shape {tuple(y.shape)}")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            row = int(np.argwhere(~np.isfinite(y))[0][0])
            raise DataError(f"{name}: the target is {float(y[row])!r} at row {row}; remove those rows")
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
        _check_values(y, name, "target")
        targets = torch.as_tensor(y, dtype=torch.float64)
        out_features = int(y.shape[1])

    i_train, i_val, i_test = _split_index(X.shape[0], fractions, seed)
    if missing == "mean":  # the training rows' means, ignoring the missing entries; every split filled with them
        train = X[i_train]
        empty = [j for j in range(X.shape[1]) if np.isnan(train[:, j]).all()]
        if empty:
            column = repr(feature_names[empty[0]]) if feature_names is not None else str(empty[0])
            raise DataError(f"{name}: feature column {column} has no value in the training rows to take a mean of")
        fill = np.array([np.nanmean(train[:, j]) if np.isnan(train[:, j]).any() else train[:, j].mean()
                         for j in range(X.shape[1])])  # fmt: skip
        info["feature_fill"] = fill.tolist()
        info["rows_filled"] = int(absent.any(axis=1).sum())
        X = np.where(absent, fill, X)
    features = torch.as_tensor(X, dtype=torch.float64)
    if standardize:
        mean = features[i_train].mean(0)
        std = features[i_train].std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        features = (features - mean) / std
        info["feature_mean"], info["feature_std"] = mean.tolist(), std.tolist()  # what predict applies
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


def _decode(path: Path, encoding: str | None) -> tuple[str, str]:
    """The file's text and the encoding used: UTF-8 (a byte-order mark is dropped) unless ``encoding``."""
    raw = path.read_bytes()
    used = encoding or "utf-8"
    try:
        text = raw.decode(used)
    except LookupError:
        raise DataError(
            f"{path.name}: unknown encoding {encoding!r}; use a Python codec name such as utf-8, latin-1 or cp1252"
        ) from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path.name}: byte {e.start} (line {line}, {raw[e.start : e.start + 1]!r}) is not valid {used}; "
            "if the file is in another encoding, name it with --encoding (e.g. --encoding latin-1 or cp1252)"
        ) from None
    return text.removeprefix("\ufeff"), used


def _sniff_delimiter(text: str) -> str:
    """The delimiter of :data:`DELIMITERS` that splits the first rows into the same number (> 1) of
    fields, the most fields winning; if none is consistent, the one giving the header most fields."""
    best, best_n, fallback, fallback_n = None, 1, ",", 1
    for d in DELIMITERS:
        try:
            rows = [r for r in itertools.islice(csv.reader(io.StringIO(text), delimiter=d), 50) if "".join(r).strip()]
        except csv.Error:  # e.g. a NUL byte; reading the file reports it
            continue
        if not rows:
            continue
        counts = {len(r) for r in rows}
        if len(counts) == 1 and len(rows[0]) > best_n:
            best, best_n = d, len(rows[0])
        if len(rows[0]) > fallback_n:
            fallback, fallback_n = d, len(rows[0])
    return best or fallback


def load_csv(path: str | Path, target: str | None, *, task: Task | None = None, seed: int = 0,
             fractions: Sequence[float] = DEFAULT_FRACTIONS, encoding: str | None = None, delimiter: str | None = None,
             missing: str = "error") -> DataBundle:
    """A CSV file with a header row; ``target`` names the label column, all other columns are features.

    The file is read as UTF-8 (with or without a byte-order mark) unless ``encoding`` names another
    codec; the delimiter (comma, semicolon or tab) is sniffed from the first rows unless
    ``delimiter`` is given. Column names must be unique; every feature must be a number, finite and
    within float32's range. The task is inferred from the target column (see :func:`infer_task`)
    unless ``task`` is given; ``info`` records the encoding, delimiter and why the task was chosen.
    Missing values (empty cells, ``NA``, ...) are handled as ``missing`` says (see the module docstring).
    Rows in error messages are the file's line numbers (the header is line 1).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; check the path")
    if target is None:
        raise DataError(f"{path.name}: a CSV needs --target COLUMN naming the label column")
    if delimiter is not None and len(delimiter) != 1:
        raise DataError(f"the delimiter must be one character (e.g. ',', ';' or a tab), got {delimiter!r}")
    text, used = _decode(path, encoding)
    delimiter = delimiter or _sniff_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = [(reader.line_num, r) for r in reader if any(cell.strip() for cell in r)]
    except csv.Error as e:
        raise DataError(f"{path.name}: line {reader.line_num} is not valid CSV ({e})") from None
    if not rows:
        raise DataError(f"{path.name}: the file is empty; it needs a header row and at least 3 data rows")
    header, body = [h.strip() for h in rows[0][1]], rows[1:]
    duplicates = sorted(h for h, c in Counter(header).items() if c > 1)
    if duplicates:
        names = ", ".join(map(repr, duplicates))
        raise DataError(f"{path.name}: column name(s) {names} appear more than once in the header; rename them")
    if "" in header:
        raise DataError(f"{path.name}: column {header.index('') + 1} of the header has no name; name or drop it")
    if target not in header:
        hint = (
            f"; the header is one column: if the file is not {'tab' if delimiter == chr(9) else repr(delimiter)}-"
            "delimited, name its delimiter with --delimiter"
            if len(header) == 1
            else ""
        )
        raise DataError(f"{path.name}: no column {target!r}; the columns are {', '.join(header)}{hint}")
    if not body:
        raise DataError(f"{path.name}: the file has a header but no data rows")
    for line, r in body:
        if len(r) != len(header):
            raise DataError(f"{path.name}: line {line} has {len(r)} fields, the header has {len(header)}")
    t = header.index(target)
    dropped = 0
    if missing == "drop":  # a row without a target cannot be used
        kept = [(line, r) for line, r in body if r[t].strip().lower() not in MISSING_CELLS]
        dropped, body = len(body) - len(kept), kept
        if not body:
            raise DataError(f"{path.name}: the target column {target!r} is empty in every row")
    feature_names = [h for j, h in enumerate(header) if j != t]
    X = np.empty((len(body), len(feature_names)))
    for j_out, j in enumerate(j for j in range(len(header)) if j != t):
        for i, (line, r) in enumerate(body):
            cell = r[j].strip()
            if cell.lower() in MISSING_CELLS:
                if missing == "error":
                    what = "an empty cell" if not cell else repr(cell)
                    raise DataError(
                        f"{path.name}: column {header[j]!r} has a missing value at line {line} ({what}); {MISSING_HINT}"
                    )
                X[i, j_out] = math.nan
                continue
            v = _parse_float(r[j])
            if v is None:
                raise DataError(
                    f"{path.name}: column {header[j]!r} is not numeric (line {line}: {r[j]!r}); "
                    "features must be numbers: encode or drop that column"
                )
            why = _bad_value(v)
            if why is not None:
                raise DataError(
                    f"{path.name}: column {header[j]!r} holds {r[j].strip()!r} at line {line}, {why}; "
                    "remove, impute or rescale it"
                )
            X[i, j_out] = v
    labels = [r[t].strip() for _, r in body]
    if any(label.lower() in MISSING_CELLS for label in labels):
        line = next(line for (line, _), label in zip(body, labels) if label.lower() in MISSING_CELLS)
        raise DataError(
            f"{path.name}: the target column {target!r} has a missing value at line {line}; "
            "remove that row, or pass --missing drop to drop such rows"
        )
    numeric = [_parse_float(v) for v in labels]
    if all(v is not None for v in numeric):
        for (line, _), v, label in zip(body, numeric, labels, strict=True):
            why = _bad_value(v)  # type: ignore[arg-type]
            if why is not None:
                raise DataError(
                    f"{path.name}: the target column {target!r} holds {label!r} at line {line}, {why}; remove that row"
                )
        y = np.array(numeric, dtype=np.float64)
    else:
        y = np.array(labels, dtype=str)
    bundle = from_arrays(X, y, name=path.stem, task=task, seed=seed, fractions=fractions, feature_names=feature_names,
                         missing=missing, rows_dropped=dropped)  # fmt: skip
    bundle.info.update(encoding=used, delimiter=delimiter)
    return bundle


def load_npz(path: str | Path, *, task: Task | None = None, seed: int = 0,
             fractions: Sequence[float] = DEFAULT_FRACTIONS, missing: str = "error") -> DataBundle:
    """An ``.npz`` archive holding ``X [M, F]`` and ``y [M]`` (no pickled objects are loaded); NaN
    features are missing values, handled as ``missing`` says."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as archive:
            lacking = [k for k in ("X", "y") if k not in archive.files]
            if lacking:
                raise DataError(
                    f"{path.name}: the archive lacks {' and '.join(lacking)}; it holds {archive.files or 'nothing'} "
                    "and needs arrays named X and y"
                )
            X, y = archive["X"], archive["y"]
    except DataError:
        raise
    except Exception as e:  # zipfile/pickle errors: not a usable npz
        raise DataError(f"{path.name}: cannot read it as an .npz archive ({e})") from e
    return from_arrays(X, y, name=path.stem, task=task, seed=seed, fractions=fractions, missing=missing)
