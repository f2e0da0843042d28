"""The documentation's internal consistency, checked without building the site.

``make docs`` builds it with ``mkdocs build --strict`` (which also validates every link between pages);
these tests cover what that does not, and run in the default suite where MkDocs is not installed:
README's relative links, the nav against the files, and the pages that ``docs/hooks.py`` generates.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _hooks():
    spec = importlib.util.spec_from_file_location("descend_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # links inside code are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def _nav_pages() -> list[str]:
    return re.findall(r"^\s*- [^:\n]+: (\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.MULTILINE)


def test_readme_is_short_and_its_relative_links_resolve() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    links = _relative_links(readme)
    assert len(links) >= 10, "README should link into the docs"
    broken = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not broken, f"README links to missing files: {broken}"


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    nav = _nav_pages()
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == sorted(nav), "a page is listed twice in the nav"
    assert sorted(nav) == pages, (
        f"in the nav but missing: {sorted(set(nav) - set(pages))}; not in the nav: {sorted(set(pages) - set(nav))}"
    )


def test_relative_links_between_docs_pages_resolve() -> None:
    broken = []
    for page in DOCS.rglob("*.md"):
        for target in _relative_links(page):
            if not (page.parent / target.split("#")[0]).resolve().exists():
                broken.append(f"{page.relative_to(DOCS)} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_every_page_starts_with_a_title() -> None:
    untitled = [str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if not p.read_text().startswith("# ")]
    assert not untitled, f"pages without a '# Title' first line: {untitled}"


def test_cli_reference_lists_every_command_with_its_help() -> None:
    hooks = _hooks()
    parser = hooks.cli_parser()
    commands = [name for name, _, _ in hooks._subcommands(parser)]
    assert {"train", "compare"} <= set(commands)
    page = hooks.cli_reference()
    for name, _, sub in hooks._subcommands(parser):
        assert f"## `descend {name}`" in page
        for action in sub._actions:
            for option in action.option_strings:
                assert option in page, f"descend {name} {option} missing from the reference"


def test_every_benchmark_result_is_rendered_on_the_performance_page() -> None:
    hooks = _hooks()
    page = (DOCS / "performance.md").read_text()
    rendered = hooks.expand(page)
    assert "<!-- generate:" not in rendered
    for result in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        assert f"benchmarks/results/{result.name}" in rendered, f"{result.name} is not on the performance page"


def test_performance_summary_finds_its_rows() -> None:
    summary = _hooks().optimizer_ratios()
    rows = [line for line in summary.splitlines() if line.startswith("| descend")]
    assert len(rows) >= 3, f"the summary's row names no longer match benchmarks/results: {summary}"


def test_optimizer_table_reproduces_the_json() -> None:
    hooks = _hooks()
    name = "optimizer_step_1M.json"
    data = hooks.load_result(name)
    table = hooks.optimizer_step(name)
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(lines) == len(data["rows"])
    first = data["rows"][0]
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[0] == first["name"]
    assert float(cells[1].replace(",", "")) == pytest.approx(first["ms"], abs=0.05)
    assert float(cells[6].rstrip("x")) == pytest.approx(first["vs_torch_fused_adamw"], abs=0.005)
    assert f"{data['steps']} steps" in table and data["torch"] in table  # the caption states method and machine


def test_generated_optimizer_pages_match_the_code() -> None:
    from descend import optim

    hooks = _hooks()
    equations = hooks.rule_equations()
    assert optim.ema(0.5).equation() in equations
    assert len(equations.splitlines()) == len(hooks.RULES)
    with pytest.raises(KeyError, match="unknown generator"):
        hooks.expand("<!-- generate: no-such-thing -->")


def test_every_example_is_documented() -> None:
    page = (DOCS / "guide" / "examples.md").read_text()
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert f"examples/{script.name}" in page, f"{script.name} is not on docs/guide/examples.md"


def test_api_pages_show_sphinx_markup_as_what_it_means() -> None:
    hooks = _hooks()
    html = ("<p>See :func:<code>descend.optim.chain</code>, :class:<code>~descend.data.Split</code> and "
            ":meth:<code>radius &lt;descend.optim._rules.WeightRule.radius&gt;</code>; keep <code>x:y</code>.</p>")
    assert hooks.tidy_docstrings(html) == ("<p>See <code>descend.optim.chain</code>, <code>Split</code> and "
                                       "<code>radius</code>; keep <code>x:y</code>.</p>")

    assert hooks.tidy_docstrings("<p>Compose your own::</p><pre>") == "<p>Compose your own:</p><pre>"
