"""descend.data: every dataset is a :class:`DataBundle` of three :class:`Split` s.

Point sets (:mod:`descend.data.points`): :func:`load_digits_points`, :func:`make_shapes`,
:func:`make_gp1d`, and the :func:`nearest_context_value` baseline for the 1-D regression sets; your own
point sets from an ``.npz`` with :func:`load_point_npz` (each set centred and scaled by
:func:`normalize_point_sets`).
"""

from descend.data._base import DataBundle, InputKind, Split, Task
from descend.data.points import (
    SHAPES,
    load_digits_points,
    load_point_npz,
    make_gp1d,
    make_shapes,
    nearest_context_value,
    normalize_point_sets,
    split_indices,
)

__all__ = [
    "SHAPES",
    "DataBundle",
    "InputKind",
    "Split",
    "Task",
    "load_digits_points",
    "load_point_npz",
    "make_gp1d",
    "make_shapes",
    "nearest_context_value",
    "normalize_point_sets",
    "split_indices",
]
