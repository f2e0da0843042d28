"""Callbacks: code of yours that runs at three points of :meth:`Trainer.fit`.

A callback is any object with some of these methods; each receives the trainer (its ``step``,
``history``, ``model``, ``optimizer``, ``early_stopping``...), and missing ones are skipped::

    class PrintEvery100:
        def on_step_end(self, trainer, row):           # after every optimizer step
            if trainer.step % 100 == 0: print(trainer.step, row.get("loss"))
        def on_validation_end(self, trainer, metrics):  # after each validation: {"val_loss": ..., ...}
            ...
        def on_fit_end(self, trainer, summary):         # once, with the summary fit() returns
            ...

    Trainer(..., callbacks=[PrintEvery100()])

``row`` is the step's logged metrics (``{}`` on steps that log nothing; at least ``loss`` when it
was measured). Callbacks run on every rank; guard file writes with ``trainer.is_main``. Setting
``trainer.should_stop = True`` ends the run after the current step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["Callback", "run_callbacks"]

EVENTS = ("on_step_end", "on_validation_end", "on_fit_end")


class Callback(Protocol):
    """The three optional hooks (a callback defines any subset)."""

    def on_step_end(self, trainer: Any, row: dict[str, Any]) -> None: ...

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None: ...


def check_callbacks(callbacks: Iterable[Any]) -> list[Any]:
    """The callbacks as a list; each must define at least one of the hooks."""
    out = list(callbacks)
    for cb in out:
        if not any(callable(getattr(cb, event, None)) for event in EVENTS):
            raise TypeError(f"callback {cb!r} defines none of {', '.join(EVENTS)}")
    return out


def run_callbacks(callbacks: list[Any], event: str, trainer: Any, payload: Any) -> None:
    """Call ``event(trainer, payload)`` on every callback that defines it, in order."""
    for cb in callbacks:
        hook = getattr(cb, event, None)
        if hook is not None:
            hook(trainer, payload)
