"""The documentation's internal consistency, checked without building the site.

``make docs`` builds it with ``mkdocs build --strict`` (which also validates every link between pages);
these tests cover what that does not, and run in the default suite where MkDocs is not installed:
README's relative links, the nav against the files, and the pages that ``docs/hooks.py`` generates.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
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


def test_performance_summary_finds_its_rows_and_names_its_columns() -> None:
    hooks = _hooks()
    summary = hooks.optimizer_ratios()
    rows = [line for line in summary.splitlines() if line.startswith("| descend")]
    assert len(rows) >= 3, f"the summary's row names no longer match benchmarks/results: {summary}"
    header = next(line for line in summary.splitlines() if line.startswith("| optimizer"))
    assert ".json" not in header, "column headers should be run names, not file names"
    names = [c.strip() for c in header.strip("|").split("|")][1:]
    assert len(set(names)) == len(names) and all(len(n) <= 14 for n in names), names
    for result in sorted(RESULTS.glob("optimizer_step*.json")):
        assert result.name in summary  # each column's file is named under the table


RESULTS = ROOT / "benchmarks" / "results"


def _table(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    split = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return split[0], split[1:]


def test_optimizer_table_reproduces_the_json() -> None:
    hooks = _hooks()
    for name in ("optimizer_step_tiny.json", "optimizer_step_1M.json", "optimizer_step_20M.json"):
        data = hooks.load_result(name)
        table = hooks.optimizer_step(name)
        head, rows = _table(table)
        assert len(rows) == len(data["rows"])
        unit = head[1]
        assert unit in ("µs/step", "ms/step")
        scale = 1e3 if unit == "µs/step" else 1.0
        for row, record in zip(rows, data["rows"]):
            assert row[0] == record["name"]
            shown = float(row[1].replace(",", ""))
            # three significant digits at least: the 100-tensor run's steps of about 0.1 ms must differ
            assert shown == pytest.approx(record["ms"] * scale, rel=5e-3, abs=0.5 if scale > 1 else 0.005)
            assert float(row[head.index("× fused AdamW")].rstrip("x")) == pytest.approx(
                record["vs_torch_fused_adamw"], abs=0.005
            )
        assert f"{data['steps']} steps" in table and data["torch"] in table  # the caption states method and machine
        assert len(head) <= 7, "a table this wide scrolls sideways at 1280 px"
    tiny = _table(hooks.optimizer_step("optimizer_step_tiny.json"))[1]
    assert len({row[1] for row in tiny}) > len(tiny) // 2, "the 100-tensor table's step times must be told apart"


def _png_of(markdown: str) -> bytes:
    import base64

    found = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert found, "no embedded PNG"
    return base64.b64decode(found.group(1))


def test_performance_page_leads_with_a_figure_from_the_json() -> None:
    hooks = _hooks()
    page = (DOCS / "performance.md").read_text()
    body = page.split("\n", 1)[1].lstrip()
    assert body.startswith("<!-- generate: performance-figure "), "the performance page should open with its figure"
    rendered = hooks.expand(body.split("\n", 1)[0])
    png = _png_of(rendered)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    width = re.search(r'width="(\d+)"', rendered)
    assert width and int(width.group(1)) <= 760  # shown at its own size in the column: fonts at their size
    for name in re.search(r"performance-figure (\S+)", page).group(1).split(","):
        assert f"benchmarks/results/{name}" in rendered


def test_home_page_figure_is_generated_from_the_experiment_json() -> None:
    hooks = _hooks()
    page = (DOCS / "index.md").read_text()
    marker = re.search(r"<!-- generate: gd-vs-sgd-figure (\S+) -->", page)
    assert marker, "the home page's figure should be generated (readable size) from the experiment's JSON"
    rendered = hooks.expand(marker.group(0))
    assert _png_of(rendered)[:4] == b"\x89PNG"
    data = json.loads((ROOT / marker.group(1)).read_text())
    assert f"over {len(data['seeds'])} seeds" in rendered


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


def test_api_pages_link_docs_paths_and_never_show_private_modules() -> None:
    hooks = _hooks()
    links = {"guide/engines.md": "../../guide/engines/", "guide/training.md": "../../guide/training/"}

    def link(path: str) -> str | None:
        name, _, anchor = path.partition("#")
        return None if name not in links else links[name] + (f"#{anchor}" if anchor else "")

    html = ("<p>see <code>docs/guide/engines.md</code>. See :mod:<code>descend.optim.engines</code>; "
            "(see :mod:<code>descend.optim._flat</code>) :func:<code>~descend.train._tuning.tune_lr</code> "
            ":mod:<code>descend.train._data</code> :mod:<code>descend.nn._secret</code></p>")
    shown = hooks.tidy_docstrings(html, link)
    assert '<a href="../../guide/engines/">Engines</a>' in shown
    assert '<a href="../../guide/engines/#engines-by-name">Engines</a>' in shown
    assert "<code>tune_lr</code>" in shown and "<code>descend.nn</code>" in shown
    assert "._" not in re.sub(r"<[^>]+>", "", shown), shown
    assert "docs/guide" not in shown
    for target in hooks.PRIVATE_PAGES.values():  # each page and heading a private module points to exists
        path, _, anchor = target.partition("#")
        headings = re.findall(r"^#+ (.+)$", (DOCS / path).read_text(), flags=re.MULTILINE)
        slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
        assert anchor in slugs, f"{target}: no such heading in docs/{path}"


def _layout():
    spec = importlib.util.spec_from_file_location("descend_docs_layout", DOCS / "layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_page_reads_at_1280_px_without_scrolling_sideways(tmp_path) -> None:
    """Builds the site and loads every page in headless Chromium at 1280 px: no code block, table or
    page is wider than its box. Writes a screenshot of each page beside the build, to look at."""
    layout = _layout()
    if layout.browser() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mkdocs is not installed (make docs installs it)")
    site = tmp_path / "site"
    build = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    problems = layout.check(site, screenshots=tmp_path / "screenshots")
    scrolling = {page: found["found"] for page, found in problems.items() if found["found"]}
    assert not scrolling, f"scrolls sideways at 1280 px: {scrolling}"
    assert len(list((tmp_path / "screenshots").glob("*.png"))) == len(layout.pages(site))
