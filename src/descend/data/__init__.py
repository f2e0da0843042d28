"""descend.data: every dataset is a :class:`DataBundle` of three :class:`Split` s.

Point sets (:mod:`descend.data.points`): :func:`load_digits_points`, :func:`make_shapes`,
:func:`make_gp1d`, and the :func:`nearest_context_value` baseline for the 1-D regression sets.
"""

from descend.data._base import DataBundle, InputKind, Split, Task
from descend.data.points import (
    SHAPES,
    load_digits_points,
    make_gp1d,
    make_shapes,
    nearest_context_value,
    split_indices,
)

__all__ = [
    "SHAPES",
    "DataBundle",
    "InputKind",
    "Split",
    "Task",
    "load_digits_points",
    "make_gp1d",
    "make_shapes",
    "nearest_context_value",
    "split_indices",
]
