"""The package layout: the library never imports its applications, and packages import one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import descend

SRC = Path(descend.__file__).parent
LIBRARY = {"optim", "nn", "data", "train", "distributed", "diagnostics", "checkpoint"}
APPLICATIONS = {"cli", "runs", "compare", "experiments", "report"}


def _module_level_imports() -> dict[str, set[str]]:
    """package -> the other descend packages its modules import at module level (not inside functions)."""
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        package = path.relative_to(SRC).parts[0].removesuffix(".py")
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "descend" and len(parts) > 1 and parts[1] != package:
                    edges.setdefault(package, set()).add(parts[1])
    return edges


def test_the_library_never_imports_an_application_at_module_level() -> None:
    edges = _module_level_imports()
    assert set(edges) >= {"train", "runs", "compare"}  # the scan sees the packages
    found = {(a, b) for a in LIBRARY for b in edges.get(a, ()) if b in APPLICATIONS}
    assert not found, f"library -> application imports: {sorted(found)}"


def test_packages_import_one_way() -> None:
    edges = _module_level_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    cycles = sorted(p for p in edges if reaches(p, p, {p}))
    assert not cycles, f"packages on an import cycle: {cycles}"


def test_importing_the_training_loop_loads_no_application_and_forwards_their_names() -> None:
    code = (
        "import sys, descend.train as t, descend.distributed as dd\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[:2] in "
        "[['descend', a] for a in ('cli', 'runs', 'compare', 'experiments', 'report')])\n"
        "assert not loaded, loaded\n"
        "from descend.train import RunSpec, compare, TASKS\n"
        "import descend.runs, descend.compare\n"
        "assert RunSpec is descend.runs.RunSpec and compare is descend.compare.compare\n"
        "assert TASKS is descend.compare.TASKS\n"
        "missing = [n for m in (t, dd) for n in m.__all__ if not hasattr(m, n)]\n"
        "assert not missing, missing\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
