"""descend.compare: the optimizer benchmark behind ``descend compare``.

Named tasks (``_tasks``), learning-rate tuning and seed statistics (``_tuning``) and the driver that
runs every optimizer on every task (``_compare``); :mod:`descend.report` renders the results.
"""

from descend.compare._compare import CompareSpec, compare, describe_tasks, resolve_plan
from descend.compare._tasks import SUITES, TASKS, Task

__all__ = ["SUITES", "TASKS", "CompareSpec", "Task", "compare", "describe_tasks", "resolve_plan"]
