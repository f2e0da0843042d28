"""Documentation assets from a ``descend compare`` run, so the docs show measured results only.

    python -m descend.report RUN_DIR/results.json docs/guide/img [--task text-lm] [--prefix compare]

writes ``PREFIX-profile.png`` (the performance profiles), ``PREFIX-summary.txt`` (the run's
conditions, summary and task tables as Markdown, included by ``docs/guide/compare.md``) and, where
headless Chromium is installed, ``PREFIX-<task>-table.png`` (that task's table as the report shows it).
The statistics are recomputed from the per-seed runs with this version's rules
(:func:`descend.compare._compare.summarise`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from descend._io import atomic_write
from descend.report._html import _STYLE, _table, task_table
from descend.report._markdown import markdown_tables
from descend.report._plots import profile_png


def _table_png(results: dict, task: str, png: Path) -> bool:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return False
    info = results["tasks"][task]
    rows = len(info["optimizers"])
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{_STYLE}body{{margin:.5em}}</style></head><body>"
        f"<h3>{task}: {info['description']}</h3>{_table(task_table(info), swatch_column=True)}</body></html>"
    )
    with tempfile.TemporaryDirectory() as tmp:
        html_path, shot = Path(tmp, "table.html"), Path(tmp, "table.png")
        html_path.write_text(page, encoding="utf-8")
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={tmp}/profile", f"--window-size=1100,{110 + 34 * rows}",
             f"--screenshot={shot}", html_path.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        atomic_write(png, shot.read_bytes())
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m descend.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json of a descend compare run")
    parser.add_argument("out", type=Path, help="directory for the assets (e.g. docs/guide/img)")
    parser.add_argument("--task", default="text-lm", help="the task whose table becomes a PNG (default: text-lm)")
    parser.add_argument("--prefix", default="compare", help="file name prefix (default: compare)")
    args = parser.parse_args(argv)
    from descend.compare._compare import summarise

    results = summarise(json.loads(args.results.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    p = args.prefix
    atomic_write(args.out / f"{p}-profile.png", profile_png(results))
    atomic_write(args.out / f"{p}-summary.txt", markdown_tables(results))
    written = [f"{p}-profile.png", f"{p}-summary.txt"]
    if args.task in results["tasks"] and _table_png(results, args.task, args.out / f"{p}-{args.task}-table.png"):
        written.append(f"{p}-{args.task}-table.png")
    print(f"wrote {', '.join(str(args.out / w) for w in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
