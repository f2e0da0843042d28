"""Datasets by name: what ``descend --data NAME_OR_PATH`` resolves.

Built-in names: ``digits`` (tabular, the default), ``digits-points``, ``shapes`` and ``gp1d``
(point sets from :mod:`descend.data.points`), ``stdlib-text`` (bytes of the standard library's
sources, :mod:`descend.data.text`). Anything else is a path: ``.csv`` (with
``target=COLUMN``) or ``.npz`` (arrays ``X`` and ``y``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from descend.data._base import DataBundle, Task
from descend.data.tabular import DataError, load_csv, load_digits, load_npz

__all__ = ["DATASETS", "DataError", "load_data"]


def _points(function: str, **options: object) -> Callable[..., DataBundle]:
    def load(seed: int = 0) -> DataBundle:
        try:
            points = importlib.import_module("descend.data.points")
        except ImportError as e:
            raise DataError(f"the point-set datasets need descend.data.points, which is not installed ({e})") from e
        return getattr(points, function)(seed=seed, **options)

    return load


#: Built-in dataset name -> loader ``(seed) -> DataBundle``.
DATASETS: dict[str, Callable[..., DataBundle]] = {
    "digits": load_digits,
    "digits-points": _points("load_digits_points"),
    # scale-free clouds in their principal axes: the setting the >= 95% learning test uses
    "shapes": _points("make_shapes", pose="principal", normalise=True),
    "gp1d": _points("make_gp1d"),
    # byte-level language modelling on the standard library's .py files (descend.data.text)
    "stdlib-text": lambda seed=0: importlib.import_module("descend.data.text").load_stdlib_text(seed=seed),
}


def load_data(name_or_path: str, *, target: str | None = None, task: Task | None = None, seed: int = 0) -> DataBundle:
    """The dataset ``name_or_path``: a built-in name (see :data:`DATASETS`), a ``.csv`` or an ``.npz``.

    ``target`` names a CSV's label column; ``task`` overrides the inferred task of a file;
    ``seed`` fixes the train/val/test split (and the draw, for synthetic sets).
    """
    if name_or_path in DATASETS:
        if target is not None:
            raise DataError(f"--target is for CSV files; the built-in dataset {name_or_path!r} has its own labels")
        bundle = DATASETS[name_or_path](seed=seed)
        if task is not None and task != bundle.task:
            raise DataError(f"dataset {name_or_path!r} is a {bundle.task} task; drop --task {task}")
        return bundle
    path = Path(name_or_path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_csv(path, target, task=task, seed=seed)
    if suffix == ".npz":
        if target is not None:
            raise DataError("--target is for CSV files; an .npz holds its targets in the array 'y'")
        return load_npz(path, task=task, seed=seed)
    if path.exists():
        raise DataError(f"cannot read {name_or_path!r}: use a .csv or .npz file, or one of {', '.join(DATASETS)}")
    raise DataError(
        f"unknown dataset {name_or_path!r}: use one of {', '.join(DATASETS)}, or a path to a .csv or .npz file"
    )
