"""``python -m descend``: the same as the ``descend`` command (also what torchrun launches)."""

from descend.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
