"""Learning-rate schedules as multiplicative factors ``lr_t = lr · f(t)``, with an optional linear warm-up.

``t`` counts optimizer steps taken (0 for the first step), ``T`` is the total number of steps and
``W`` the warm-up length:

- warm-up (any schedule, ``t < W``): ``f(t) = (t + 1) / W``
- ``constant``: ``f(t) = 1``
- ``cosine``:   ``f(t) = m + (1 - m) · ½ (1 + cos(π · (t - W) / (T - W)))``, ``m = min_factor``
- ``linear``:   ``f(t) = m + (1 - m) · (1 - (t - W) / (T - W))``
- ``step``:     ``f(t) = γ^⌊(t - W) / step_size⌋``
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["SCHEDULES", "Schedule"]

SCHEDULES = ("constant", "cosine", "linear", "step")


@dataclass
class Schedule:
    """A picklable, JSON-describable factor ``f(t)`` for ``torch.optim.lr_scheduler.LambdaLR``."""

    name: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    min_factor: float = 0.0
    step_size: int = 1
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule={self.name!r} is not supported; expected one of {SCHEDULES}")
        if self.warmup_steps < 0 or self.total_steps < 1 or self.step_size < 1:
            raise ValueError(
                f"schedule needs warmup_steps >= 0, total_steps >= 1, step_size >= 1; got {self.warmup_steps}, "
                f"{self.total_steps}, {self.step_size}"
            )

    @property
    def is_constant(self) -> bool:
        return self.name == "constant" and self.warmup_steps == 0

    def __call__(self, t: int) -> float:
        w = self.warmup_steps
        if t < w:
            return (t + 1) / w
        if self.name == "constant":
            return 1.0
        if self.name == "step":
            return self.gamma ** ((t - w) // self.step_size)
        progress = min(1.0, (t - w) / max(1, self.total_steps - w))
        m = self.min_factor
        if self.name == "cosine":
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))
        return m + (1 - m) * (1 - progress)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
