"""Datasets by name: what ``descend --data NAME_OR_PATH`` resolves.

Built-in names: ``digits`` (tabular, the default), ``digits-points``, ``shapes`` and ``gp1d``
(point sets from :mod:`descend.data.points`), ``stdlib-text`` (bytes of the standard library's
sources, :mod:`descend.data.text`). Anything else is a path: ``.csv`` (with
``target=COLUMN``), ``.npz`` (arrays ``X`` and ``y``, or point sets: ``locations``, ``values``,
``mask`` and ``y``), or text to model byte by byte: a ``.txt`` file or a directory of text files
(:func:`descend.data.text.load_text_files`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

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
    "stdlib-text": lambda seed=0, context=64: importlib.import_module("descend.data.text").load_stdlib_text(
        seed=seed, context=context
    ),
}
#: The built-in datasets of text, which take a ``context`` (bytes per window).
TEXT_DATASETS = frozenset({"stdlib-text"})


def _is_point_archive(path: Path) -> bool:
    """True when an ``.npz`` holds point sets (``locations``, or a 3-D ``X``); read without pickle."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "locations" in archive.files:
                return True
            return "X" in archive.files and archive["X"].ndim == 3
    except Exception:  # not a readable archive: the tabular loader says why
        return False


def load_data(name_or_path: str, *, target: str | None = None, task: Task | None = None, seed: int = 0,
              normalize_points: bool = True, encoding: str | None = None, delimiter: str | None = None,
              context: int = 64, missing: str = "error") -> DataBundle:
    """The dataset ``name_or_path``: a built-in name (see :data:`DATASETS`), a ``.csv`` or an ``.npz``.

    ``target`` names a CSV's label column (``encoding`` and ``delimiter`` how to read it; default:
    UTF-8 and sniffed); ``task`` overrides the inferred task of a file; ``seed`` fixes the
    train/val/test split (and the draw, for synthetic sets). An ``.npz`` holds a table (``X [M, F]``,
    ``y``) or point sets (``locations [N, P, d]``, optional ``values [N, P, k]`` and ``mask [N, P]``,
    ``y``; or a 3-D ``X`` as the locations), each set centred and scaled unless
    ``normalize_points=False`` (see :func:`descend.data.points.load_point_npz`). ``missing`` says what
    a table's missing feature values do: ``"error"``, ``"drop"`` the row or fill the training ``"mean"``.
    Text (a ``.txt`` file or a directory) is cut into windows of ``context`` bytes and split by
    contiguous spans, the same for every ``seed``.
    """
    if name_or_path in DATASETS:
        if target is not None:
            raise DataError(f"--target is for CSV files; the built-in dataset {name_or_path!r} has its own labels")
        options = {"context": context} if name_or_path in TEXT_DATASETS else {}
        bundle = DATASETS[name_or_path](seed=seed, **options)
        if task is not None and task != bundle.task:
            raise DataError(f"dataset {name_or_path!r} is a {bundle.task} task; drop --task {task}")
        return bundle
    path = Path(name_or_path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_csv(path, target, task=task, seed=seed, encoding=encoding, delimiter=delimiter, missing=missing)
    if suffix == ".npz":
        if target is not None:
            raise DataError("--target is for CSV files; an .npz holds its targets in the array 'y'")
        if path.is_file() and _is_point_archive(path):
            from descend.data.points import load_point_npz

            return load_point_npz(path, task=task, seed=seed, normalize=normalize_points)
        return load_npz(path, task=task, seed=seed, missing=missing)
    if suffix == ".txt" or path.is_dir():
        if target is not None or task not in (None, "classification"):
            raise DataError("text is modelled byte by byte (a classification over 256 bytes): drop --target and --task")
        from descend.data.text import load_text_files

        return load_text_files(path, context=context)
    if path.exists():
        raise DataError(
            f"cannot read {name_or_path!r}: use a .csv, .npz or .txt file, a directory of text files, "
            f"or one of {', '.join(DATASETS)}"
        )
    raise DataError(
        f"unknown dataset {name_or_path!r}: use one of {', '.join(DATASETS)}, or a path to a .csv, .npz or .txt "
        "file or a directory of text files"
    )
