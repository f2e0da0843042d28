"""Use a trained run: ``descend predict RUN_DIR --data FILE`` and the preprocessing record it reads.

``descend train`` writes ``RUN_DIR/preprocessing.json`` beside the weights: the task, the classes,
the feature columns with the training split's means and standard deviations, the target's scale,
and whether point sets were centred and scaled. :func:`predict` applies exactly that to new rows:

    tables:      x' = (x - mean_train) / std_train, columns matched by name (CSV) or position (npz);
                 a missing value handled as in training (--missing: error, drop the row, fill the mean)
    point sets:  each set centred and scaled to unit RMS radius when the run did so; a file lacking
                 values or mask that training needed (not all ones / some sets padded) is refused
    output:      classification: argmax and softmax probabilities, by class name;
                 regression:     y = y' * std_target + mean_target (the target's own units)

and writes one row per input row to a CSV file, atomically. A file whose columns or shapes do not
match the run's is a :class:`PredictError` (one line, exit status 2 on the command line).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from descend._io import atomic_write
from descend._options import RunSpec
from descend.data._base import DataBundle, Split

__all__ = ["PredictError", "load_run_model", "predict", "preprocessing_record"]

FORMAT = 1


class PredictError(ValueError):
    """Prediction cannot run on this run or data as given; the message says why and what to do."""


def preprocessing_record(spec: RunSpec, bundle: DataBundle) -> dict[str, Any]:
    """What ``descend predict`` needs to turn a new file into the model's inputs and its outputs back."""
    info = bundle.info
    return {
        "format": FORMAT,
        "task": bundle.task,
        "input_kind": bundle.input_kind,
        "in_features": bundle.in_features,
        "out_features": bundle.out_features,
        "location_dim": bundle.location_dim,
        "value_dim": bundle.value_dim,
        "classes": info.get("classes") if bundle.task == "classification" else None,
        "target": spec.target,
        "feature_names": info.get("feature_names"),
        "feature_mean": info.get("feature_mean"),
        "feature_std": info.get("feature_std"),
        "target_mean": info.get("target_mean"),
        "target_std": info.get("target_std"),
        "missing": info.get("missing", "error"),
        "feature_fill": info.get("feature_fill"),
        "normalize_points": bool(info.get("normalize_points", False)),
        "encoding": info.get("encoding"),
        "delimiter": info.get("delimiter"),
        "model": {"name": spec.model, "depth": spec.depth, "width": spec.width, "activation": spec.activation,
                  "heads": spec.heads},
        "context": info.get("context"),
        "point_arrays": _point_arrays_needed(bundle),
    }


def _point_arrays_needed(bundle: DataBundle) -> list[str] | None:
    """The arrays a point-set file must hold for prediction: ``locations``, plus ``values`` when the
    training values were not all 1 and ``mask`` when some training set was padded (the defaults of a
    missing array, ones and all real, would silently differ from what the model learnt on)."""
    if bundle.input_kind != "pointset":
        return None
    _, values, mask = bundle.train.inputs
    needed = ["locations"]
    if not bool((values[mask] == 1).all()):
        needed.append("values")
    if not bool(mask.all()):
        needed.append("mask")
    return needed


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise PredictError(f"{path.parent}: no {path.name}; {what}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PredictError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise PredictError(f"{path}: not a JSON object")
    return value


def _shape_bundle(record: dict[str, Any]) -> DataBundle:
    """An empty :class:`DataBundle` with the run's shapes: what :func:`build_model` reads."""
    empty = Split((torch.zeros(0),), torch.zeros(0))
    return DataBundle(
        name="predict",
        task=record["task"],
        input_kind=record["input_kind"],
        train=empty,
        val=empty,
        test=empty,
        out_features=int(record["out_features"]),
        in_features=record.get("in_features"),
        location_dim=record.get("location_dim"),
        value_dim=record.get("value_dim"),
        info={"context": record.get("context")},
    )


def _table_from_csv(path: Path, record: dict[str, Any]) -> np.ndarray:
    """The run's feature columns of a CSV file, ``[rows, F]`` float64, matched by name (extra columns ignored);
    a missing value is NaN when the run handles them (``--missing drop|mean``), else an error."""
    from descend.data.tabular import MISSING_CELLS, _bad_value, _decode, _parse_float, _sniff_delimiter

    try:
        text, _ = _decode(path, record.get("encoding"))
    except ValueError as e:
        raise PredictError(str(e)) from None
    delimiter = _sniff_delimiter(text)
    rows = [(i + 1, r) for i, r in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))]
    rows = [(line, r) for line, r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise PredictError(f"{path.name}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0][1]]
    names = record.get("feature_names")
    if names is None:  # a dataset without column names: every column but the target, in order
        names = [h for h in header if h != record.get("target")]
        if len(names) != record["in_features"]:
            raise PredictError(
                f"{path.name}: has {len(names)} feature columns, the run's model takes {record['in_features']}"
            )
    missing = [n for n in names if n not in header]
    if missing:
        raise PredictError(
            f"{path.name}: missing column(s) {', '.join(map(repr, missing))} that the model was trained on; "
            f"it needs {', '.join(names)}"
        )
    index = [header.index(n) for n in names]
    X = np.empty((len(rows) - 1, len(names)))
    for i, (line, r) in enumerate(rows[1:]):
        if len(r) != len(header):
            raise PredictError(f"{path.name}: line {line} has {len(r)} fields, the header has {len(header)}")
        for j, k in enumerate(index):
            if r[k].strip().lower() in MISSING_CELLS:
                if record.get("missing", "error") == "error":
                    raise PredictError(
                        f"{path.name}: column {names[j]!r} has a missing value at line {line}; fill it in "
                        "(the run was trained with --missing error: train with --missing mean or drop to handle them)"
                    )
                X[i, j] = np.nan
                continue
            v = _parse_float(r[k])
            if v is None or _bad_value(v) is not None:
                raise PredictError(
                    f"{path.name}: column {names[j]!r} holds {r[k].strip()!r} at line {line}; give a finite number"
                )
            X[i, j] = v
    return X


def _handle_missing(X: np.ndarray, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``X`` with its missing (NaN) entries handled as in training, and the input row of each row kept:
    ``mean`` fills the training means (``feature_fill``), ``drop`` leaves the row out."""
    rows = np.arange(len(X))
    absent = np.isnan(X)
    if not absent.any():
        return X, rows
    if record.get("missing") == "mean":
        return np.where(absent, np.asarray(record["feature_fill"], dtype=np.float64), X), rows
    keep = ~absent.any(axis=1)
    return X[keep], rows[keep]


def _inputs(path: Path, record: dict[str, Any]) -> tuple[tuple[Tensor, ...], np.ndarray, int]:
    """The model's inputs for the rows of ``path``, preprocessed as the run's training data was; the
    input row (counting from 0) each one comes from (rows with a missing value are left out under
    ``drop``); and the number of input rows."""
    if not path.is_file():
        raise PredictError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    kind = record["input_kind"]
    if kind == "vector":
        if suffix == ".csv":
            X = _table_from_csv(path, record)
        elif suffix == ".npz":
            arrays = _npz(path)
            if "X" not in arrays:
                raise PredictError(f"{path.name}: the archive lacks X; it holds {', '.join(arrays) or 'nothing'}")
            X = arrays["X"]
            if X.ndim == 1:
                X = X[:, None]
            if X.ndim != 2 or X.shape[1] != record["in_features"] or X.dtype.kind not in "biuf":
                raise PredictError(
                    f"{path.name}: X must be numeric of shape [rows, {record['in_features']}], "
                    f"got {X.dtype} {tuple(X.shape)}"
                )
            X = X.astype(np.float64)
            handled = record.get("missing", "error") != "error"
            if not np.isfinite(np.where(np.isnan(X), 0.0, X) if handled else X).all():
                raise PredictError(f"{path.name}: X holds NaN/inf values; remove or impute them")
        else:
            raise PredictError(f"--data {path}: use a .csv or .npz file")
        total = len(X)
        X, rows = _handle_missing(X, record)
        features = torch.as_tensor(X, dtype=torch.float64)
        if record.get("feature_mean") is not None:
            mean = torch.tensor(record["feature_mean"], dtype=torch.float64)
            std = torch.tensor(record["feature_std"], dtype=torch.float64)
            features = (features - mean) / std
        return (features.float(),), rows, total
    if kind == "pointset":
        if suffix != ".npz":
            raise PredictError(f"--data {path}: point sets are read from an .npz (locations, values, mask)")
        from descend.data.points import normalize_point_sets, point_arrays

        raw = _npz(path)
        needed = record.get("point_arrays") or ()
        missing = [k for k in needed if k not in raw and not (k == "locations" and "X" in raw)]
        if missing:
            raise PredictError(
                f"{path.name}: lacks {' and '.join(missing)}, which the model was trained with; give "
                f"{', '.join(needed)} as in training (the file holds {', '.join(raw) or 'nothing'})"
            )
        try:
            arrays = point_arrays(raw, path.name, need_y=False)
        except ValueError as e:
            raise PredictError(str(e)) from None
        d, k = arrays["locations"].shape[2], arrays["values"].shape[2]
        if (d, k) != (record["location_dim"], record["value_dim"]):
            raise PredictError(
                f"{path.name}: points have {d} coordinates and {k} values each, the run's model takes "
                f"{record['location_dim']} and {record['value_dim']}"
            )
        locations = torch.as_tensor(arrays["locations"], dtype=torch.float32)
        mask = torch.as_tensor(arrays["mask"])
        if record.get("normalize_points"):
            locations = normalize_point_sets(locations, mask)
        values = torch.as_tensor(arrays["values"], dtype=torch.float32) * mask[..., None]
        return (locations, values, mask), np.arange(len(locations)), len(locations)
    raise PredictError(f"predict reads tables and point sets; this run's inputs are {kind!r}")


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except Exception as e:  # zip/pickle errors: not a usable archive
        raise PredictError(f"{path.name}: cannot read it as an .npz archive ({e})") from None


def _run_record(run_dir: Path) -> dict[str, Any]:
    """The preprocessing record of a run directory written by ``descend train``."""
    if not run_dir.is_dir():
        raise PredictError(f"{run_dir}: not a run directory (give the --out of a `descend train` run)")
    record = _read_json(run_dir / "preprocessing.json", "was this run written by `descend train`? train it again")
    if record.get("format") != FORMAT:
        raise PredictError(f"{run_dir}/preprocessing.json: format {record.get('format')!r} is not {FORMAT}")
    return record


def load_run_model(run_dir: str | Path, device: str = "auto") -> tuple[torch.nn.Module, torch.device]:
    """The trained model of ``run_dir`` (its final weights), in evaluation mode on ``device``, and that device."""
    from safetensors.torch import load_file

    from descend.train._build import build_model
    from descend.train._device import resolve_device

    run_dir = Path(run_dir)
    record = _run_record(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise PredictError(f"{run_dir}: no model.safetensors; the run has not finished (resume it with --resume)")
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise PredictError(f"--device {device}: {e}") from None
    state = load_file(weights)
    if record.get("context") is None and "position" in state:  # a language model's context is its positions
        record = {**record, "context": int(state["position"].shape[0])}
    m = record["model"]
    model = build_model(
        m["name"], _shape_bundle(record), depth=m["depth"], width=m["width"], activation=m["activation"],
        heads=m.get("heads", 4),  # runs recorded before heads was an option used 4
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise PredictError(f"{weights}: does not fit the run's model ({str(e).splitlines()[0]})") from None
    return model.to(dev).eval(), dev


def predict(run_dir: str | Path, data: str | Path, out: str | Path, *, device: str = "auto",
            batch_size: int = 1024) -> dict[str, Any]:
    """Predict every row of ``data`` with the model of ``run_dir``; write ``out`` (CSV) atomically.

    Columns: ``row``, then ``prediction`` and ``p_<class>`` per class (classification), or the target
    column(s) in the target's units (regression); ``row`` is the input row (counting from 0), since a run
    trained with ``--missing drop`` leaves out rows with a missing value (``skipped`` counts them) and
    one trained with ``--missing mean`` fills them with the training means. Returns
    ``{"rows", "out", "task", "skipped"}``.
    """
    run_dir, data, out = Path(run_dir), Path(data), Path(out)
    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    record = _run_record(run_dir)
    inputs, row_ids, total = _inputs(data, record)
    model, dev = load_run_model(run_dir, device)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(inputs[0]), batch_size):
            batch = tuple(t[start : start + batch_size].to(dev) for t in inputs)
            outputs.append(model(*batch).float().cpu())
    y = torch.cat(outputs) if outputs else torch.zeros(0, record["out_features"])
    rows: list[list[Any]]
    if record["task"] == "classification":
        classes = [str(c) for c in record.get("classes") or range(record["out_features"])]
        probabilities = torch.softmax(y, dim=-1)
        rows = [["row", "prediction", *(f"p_{c}" for c in classes)]]
        for i, p in zip(row_ids.tolist(), probabilities.tolist()):
            rows.append([i, classes[int(np.argmax(p))], *(f"{v:.6g}" for v in p)])
    else:
        y = y.double()
        if record.get("target_mean") is not None:
            y = y * torch.tensor(record["target_std"]) + torch.tensor(record["target_mean"])
        target = record.get("target") or "prediction"
        names = [target] if y.shape[1] == 1 else [f"{target}_{j}" for j in range(y.shape[1])]
        rows = [["row", *names], *([i, *(f"{v:.9g}" for v in r)] for i, r in zip(row_ids.tolist(), y.tolist()))]
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    atomic_write(out, text.getvalue())
    return {"rows": len(rows) - 1, "out": str(out), "task": record["task"], "skipped": total - (len(rows) - 1)}
