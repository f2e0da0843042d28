"""The ``descend`` command. Parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import sys

from descend import __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``descend`` console script (placeholder until the CLI lands)."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print("usage: descend [--version]")
        return 0
    print(f"descend {__version__}")
    return 0
