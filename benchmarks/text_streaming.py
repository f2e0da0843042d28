"""Peak memory of ``descend train`` on text files of growing size: the corpus streams from disk.

    python benchmarks/text_streaming.py [--sizes 5e6,5.4e9] [--dir DIR] [--steps 20] [--out results.json]

For each size a text file of that many bytes is generated under ``--dir`` (lines of words drawn by a
seeded generator, written in pieces, so the benchmark itself never holds it), then
``descend train --data FILE --model transformer`` runs in a child process; its peak resident set
(``ru_maxrss``) and wall time are recorded, and the file is deleted. A run reads the file once in
pieces (to check it is UTF-8 and record its SHA-256), then reads each training and evaluation window
from disk when it needs it, and shuffles a large split by key instead of storing its order, so the
peak should not grow with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from descend._io import write_json

WORDS = "the of and to in is that for it as with was on be by at this are from or an have not which but".split()
PROBE = """
import json, resource, subprocess, sys
done = subprocess.run([sys.executable, "-m", "descend", *sys.argv[1:]], capture_output=True, text=True)
print(json.dumps({"rc": done.returncode, "err": done.stderr[-400:], "out": done.stdout[-400:],
                  "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def write_text(path: Path, size: int, seed: int = 0) -> None:
    """``size`` bytes of word lines, generated 1 MB at a time (one block reused with a rotating offset)."""
    rng = random.Random(seed)
    block = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(20_000)).encode() + b"\n"
    written = 0
    with path.open("wb") as f:
        while written < size:
            shift = rng.randrange(len(block))
            piece = (block[shift:] + block[:shift])[: size - written]
            f.write(piece)
            written += len(piece)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5e6,5.4e9", help="file sizes in bytes, comma-separated")
    parser.add_argument("--dir", type=Path, default=None, help="where the files are written (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="descend-text-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        path = root / f"corpus_{size}.txt"
        start = time.perf_counter()
        write_text(path, size)
        made = time.perf_counter() - start
        run = root / f"run_{size}"
        command = ["train", "--data", str(path), "--model", "transformer", "--width", "64", "--depth", "2",
                   "--steps", str(args.steps), "--batch-size", "16", "--no-progress", "--out", str(run), "--overwrite"]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        result = json.loads(done.stdout)
        os.unlink(path)
        if result["rc"] != 0:
            raise SystemExit(f"the run on {size:,} bytes failed: {result['err']}")
        summary = json.loads((run / "summary.json").read_text())
        examples = json.loads((run / "config.json").read_text())["resolved"]["examples"]
        rows.append({"bytes": size, "peak_rss_mib": result["peak_mib"], "seconds": seconds,
                     "generate_seconds": made, "train_windows": examples["train"],
                     "test_bits_per_byte": summary["test"]["bits_per_byte"]})
        print(f"{size:>15,} bytes: peak RSS {result['peak_mib']:,.0f} MiB, {seconds:,.1f} s "
              f"(file written in {made:,.1f} s)", flush=True)
    record = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "steps": args.steps, "model": "TransformerLM width 64, depth 2, context 64", "rows": rows}
    if args.out is not None:
        write_json(args.out, record)


if __name__ == "__main__":
    main()
