"""Where a run's metrics go: ``metrics.jsonl``, ``metrics.csv``, TensorBoard (if installed), the terminal.

Each logged row is one JSON object (one line) in ``metrics.jsonl``, written and flushed as it comes;
``metrics.csv`` is rewritten (atomically) from those rows on :meth:`MetricsWriter.close` (columns: the
union of keys, in order of first appearance). TensorBoard logging is opt-in and needs TensorBoard.
On a terminal a rich progress bar shows ETA, loss and the
validation metric; elsewhere plain periodic lines are printed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from descend._io import atomic_write

__all__ = ["MetricsWriter", "Progress"]


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so every line stays standard JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Append rows to ``out_dir/metrics.jsonl``; on resume from ``step``, drop rows logged after it."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, tensorboard: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "metrics.jsonl"
        rows = self.read(self.out_dir) if resume_step is not None else []
        kept = [r for r in rows if int(r.get("step", 0)) <= (resume_step or 0)]
        with self.jsonl.open("w") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        self._file: TextIO | None = self.jsonl.open("a")
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # asked for, not installed: say so rather than log nothing
                raise ValueError(
                    "tensorboard=True needs TensorBoard, which is not installed: pip install tensorboard"
                ) from e
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    @staticmethod
    def read(out_dir: str | Path) -> list[dict[str, Any]]:
        """The rows of ``out_dir/metrics.jsonl`` (empty when there is none)."""
        path = Path(out_dir) / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a crash
                continue
        return rows

    def write(self, row: dict[str, Any]) -> None:
        assert self._file is not None, "write() after close()"
        self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._tb is not None:
            self._tb.close()
        rows = self.read(self.out_dir)
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.out_dir / "metrics.csv", table.getvalue())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """A rich progress bar on a terminal, plain lines (at each evaluation) otherwise."""

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self._bar: Any = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, status="")
            self._bar.start()

    def update(self, step: int, row: dict[str, Any] | None = None) -> None:
        shown = {k: row[k] for k in ("loss", "val_loss", "val_accuracy") if row and k in row}
        if self._bar is not None:
            status = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
            if status:
                self._bar.update(self._task, completed=step, status=status)
            else:
                self._bar.update(self._task, completed=step)
        elif row is not None and any(k.startswith("val_") for k in row):
            fields = " ".join(f"{k}={_fmt(v)}" for k, v in {"epoch": row.get("epoch"), **shown}.items())
            print(f"step {step}/{self.total} {fields}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
