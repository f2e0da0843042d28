"""Screenshot a ``descend compare`` report in headless Chromium, to check that it renders.

    python benchmarks/report_screenshot.py [REPORT.html [OUT.png]]

Without arguments it runs a small comparison first (two tasks; sgd, signum, adam; 100 steps) and writes
``report.html`` and ``report.png`` under ``runs/report-screenshot/``. Needs ``chromium``
(Debian: ``apt-get install -y chromium``). Prints the PNG's size and the share of non-white pixels.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def screenshot(report: Path, png: Path, size: str = "1100,2600") -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                f"--screenshot={png.resolve()}",
                report.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> None:
    if len(sys.argv) > 1:
        report = Path(sys.argv[1])
        png = Path(sys.argv[2]) if len(sys.argv) > 2 else report.with_suffix(".png")
    else:
        from descend.compare import CompareSpec, compare
        from descend.report import write_report

        out = Path("runs/report-screenshot")
        out.mkdir(parents=True, exist_ok=True)
        spec = CompareSpec(task="digits-mlp,badly-scaled", optimizers="sgd,signum,adam", seeds=2, steps=100)
        report, png = write_report(compare(spec), out / "report.html"), out / "report.png"
    screenshot(report, png)
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    ink = float((pixels[..., :3].mean(-1) < 0.95).mean())
    print(f"{png}: {png.stat().st_size} bytes, {pixels.shape[1]}x{pixels.shape[0]} px, {ink:.1%} non-white")


if __name__ == "__main__":
    main()
