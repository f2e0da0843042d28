"""Check the built site as a reader sees it: every page at 1280 px in headless Chromium, nothing that
scrolls sideways (no code block, table or the page itself wider than its box).

    python docs/layout.py site [--width 1280] [--screenshots DIR]

``site`` is the output of ``mkdocs build``. For each page it loads a copy of the page with a small
script appended that lists, once the page has loaded, every element of the article whose content is
wider than its box and that scrolls sideways (``overflow-x: auto`` or ``scroll``), and reads that list
back from ``--dump-dom``; it also lists the code blocks whose long lines the column wraps (readable,
since a wrapped line is not hidden, but a line that fits reads better). Prints a line per finding and
exits 1 if anything scrolls sideways; ``--screenshots`` also writes a PNG of each page (the first 2000 px) to look at.
``tests/test_docs.py`` runs it on a fresh build (a slow test, skipped without Chromium or MkDocs).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTH = 1280

#: Appended to each page: what overflows its box sideways and which code wraps, as JSON in
#: ``<pre id="layout-check">``.
_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const found = [];
  const root = document.documentElement;
  if (root.scrollWidth > root.clientWidth + 1) found.push(`the page: ${root.scrollWidth} px > ${root.clientWidth} px`);
  for (const el of document.querySelectorAll("article *")) {
    const style = getComputedStyle(el);
    if (!["auto", "scroll"].includes(style.overflowX) || el.clientWidth === 0) continue;
    if (el.scrollWidth > el.clientWidth + 1) {
      const text = el.innerText.trim().split("\\n")[0].slice(0, 70);
      found.push(`${el.tagName.toLowerCase()}.${el.className}: ${el.scrollWidth} px > ${el.clientWidth} px: ${text}`);
    }
  }
  const wrapped = [];
  for (const code of document.querySelectorAll("article pre > code")) {
    const style = getComputedStyle(code);
    const height = code.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom);
    const shown = Math.round(height / parseFloat(style.lineHeight));
    const lines = code.innerText.replace(/\\n$/, "").split("\\n");
    if (shown > lines.length) {
      const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), "");
      const what = `${shown - lines.length} more row(s) than lines; longest ${longest.length} characters`;
      wrapped.push(`${what}: ${longest.slice(0, 70)}`);
    }
  }
  const out = document.createElement("pre");
  out.id = "layout-check";
  out.textContent = JSON.stringify({found: found, wrapped: wrapped});
  document.body.appendChild(out);
});
</script>
"""
_RESULT = re.compile(r'<pre id="layout-check">(.*?)</pre>', re.DOTALL)


def browser() -> str | None:
    """The headless Chromium on PATH, or ``None``."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium(args: list[str], width: int, height: int = 2000) -> str:
    exe = browser()
    if exe is None:
        raise RuntimeError("Chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
            "--virtual-time-budget=5000",
        ]  # fmt: skip
        done = subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed on {args[-1]}: {done.stderr.strip()[-500:]}")
    return done.stdout


def measure(page: Path, width: int = WIDTH) -> dict[str, list[str]]:
    """``page`` (an HTML file of the built site) at ``width`` px: ``found``, what scrolls sideways (``[]``
    if nothing), and ``wrapped``, the code blocks whose lines the column wraps (readable, but a line
    that fits reads better)."""
    probe = page.with_name(f".layout-check.{page.name}")  # beside the page, so its relative links still resolve
    html = page.read_text(encoding="utf-8")
    probe.write_text(html.replace("</body>", _SCRIPT + "</body>") if "</body>" in html else html + _SCRIPT)
    try:
        dom = _chromium(["--dump-dom", probe.resolve().as_uri()], width)
    finally:
        probe.unlink()
    found = _RESULT.search(dom)
    if found is None:
        raise RuntimeError(f"the layout check did not run on {page}")
    return json.loads(found.group(1).replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&"))


def screenshot(page: Path, png: Path, width: int = WIDTH, height: int = 2000) -> Path:
    """A PNG of the top ``height`` px of ``page`` at ``width`` px."""
    png.parent.mkdir(parents=True, exist_ok=True)
    _chromium([f"--screenshot={png.resolve()}", page.resolve().as_uri()], width, height)
    return png


def pages(site: Path) -> list[Path]:
    """Every page of a built site (its ``index.html`` files, the 404 page aside)."""
    return sorted(p for p in site.rglob("index.html") if not p.name.startswith("."))


def check(site: Path, width: int = WIDTH, screenshots: Path | None = None) -> dict[str, dict[str, list[str]]]:
    """``{page: measure(page)}`` for every page of ``site`` with something that scrolls sideways or wraps."""
    problems = {}
    for page in pages(site):
        name = str(page.parent.relative_to(site)).replace("\\", "/")
        found = measure(page, width)
        if found["found"] or found["wrapped"]:
            problems[name] = found
        if screenshots is not None:
            screenshot(page, screenshots / f"{'home' if name == '.' else name.replace('/', '-')}.png", width)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site (mkdocs build's site/)")
    parser.add_argument("--width", type=int, default=WIDTH, help=f"window width in px (default {WIDTH})")
    parser.add_argument("--screenshots", type=Path, help="also write a PNG of every page into this directory")
    args = parser.parse_args(argv)
    problems = check(args.site, args.width, args.screenshots)
    for name, found in problems.items():
        for line in found["found"]:
            print(f"{name}: scrolls sideways: {line}")
        for line in found["wrapped"]:
            print(f"{name}: code wraps: {line}")
    scrolling = [name for name, found in problems.items() if found["found"]]
    print(f"{len(pages(args.site))} pages at {args.width} px: {len(scrolling)} with something that scrolls sideways")
    return 1 if scrolling else 0


if __name__ == "__main__":
    sys.exit(main())
