"""The source tree as a newcomer reads it: imports go one way, no module imports itself back, and the
library never reaches into the applications built on it (see docs/design/layout.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = SRC / "descend"

#: Packages of the library: what a user imports to train. The applications behind the ``descend``
#: command (``cli``, the run directories, the optimizer benchmark, the experiments, the reports) build on it.
APPLICATION_MODULES = ("descend.cli", "descend.runs", "descend.compare", "descend.experiments", "descend.report")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(path: Path) -> set[str]:
    """The descend modules ``path`` imports when it is imported (not inside functions, not for type checking)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("descend"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                if base.startswith("descend"):
                    found.add(base)
                    found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(path.read_text()).body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the descend modules it imports at import time (a name imported from a package that is a
    submodule counts as that submodule; importing ``a.b.c`` also runs ``a.b``'s ``__init__``)."""
    files = {module_name(p): p for p in (SRC / "descend").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for target in module_level_imports(path):
            while target and target not in files:
                target = target.rpartition(".")[0]
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the packages on the way run their __init__
                prefix = ".".join(parts[:i])
                if prefix in files and prefix != name and not name.startswith(prefix + "."):
                    edges.add(prefix)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_library_does_not_import_the_applications() -> None:
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                   if not module.startswith(APPLICATION_MODULES) and module != "descend.__main__"
                   for target in targets if target.startswith(APPLICATION_MODULES))
    assert not wrong, "\n".join(wrong)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


LIBRARY = {"optim", "nn", "data", "train", "distributed", "diagnostics", "checkpoint"}
APPLICATIONS = {"cli", "runs", "compare", "experiments", "report"}


def _module_level_imports() -> dict[str, set[str]]:
    """package -> the other descend packages its modules import at module level (not inside functions)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGES.rglob("*.py"):
        package = path.relative_to(PACKAGES).parts[0].removesuffix(".py")
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
