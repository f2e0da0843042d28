"""Command-line options generated from the option dataclasses, and their three sources.

Every field of :class:`~descend.train.RunSpec` / :class:`~descend.train.CompareSpec` becomes a flag
(``batch_size`` -> ``--batch-size``), a key of a ``--config`` TOML file and a ``--set key=value``
target. Precedence, lowest first: the dataclass default, the TOML file, ``--set``, explicit flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

__all__ = ["UsageError", "add_options", "collect"]

_NONE = {"none", "null", ""}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class UsageError(ValueError):
    """The command line or configuration is malformed."""


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE | _FALSE:
        return low in _TRUE
    raise ValueError(f"expected true or false, got {text!r}")


def _converter(f: Field[Any]) -> Callable[[str], Any]:
    kind = str(f.type).replace("Optional[", "").replace("]", "").split("|")[0].strip()
    optional = "None" in str(f.type)
    base: Callable[[str], Any] = {"int": int, "float": float, "bool": _parse_bool}.get(kind, str)

    def convert(text: str) -> Any:
        if optional and text.strip().lower() in _NONE | ({"full"} if f.name == "batch_size" else set()):
            return None
        return base(text)

    convert.__name__ = kind  # argparse names the type in its messages
    return convert


def add_options(parser: argparse.ArgumentParser, spec: type) -> None:
    """One flag per field of the dataclass ``spec``; absent flags stay absent from the namespace."""
    for f in fields(spec):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                flag, dest=f.name, type=_converter(f), default=argparse.SUPPRESS, metavar="VALUE", help=help_text
            )


def _coerce(f: Field[Any], value: Any, source: str) -> Any:
    if isinstance(value, str):
        try:
            return _converter(f)(value)
        except ValueError as e:
            raise UsageError(f"{source}: bad value for {f.name}: {e}") from e
    kind = str(f.type).split("|")[0].strip()
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }.get(kind, False)
    if not ok:
        raise UsageError(f"{source}: {f.name} must be a {kind}, got {value!r}")
    return float(value) if kind == "float" else value


def collect(spec: type, args: argparse.Namespace) -> tuple[dict[str, Any], set[str]]:
    """The option values from ``--config``, ``--set`` and flags (in that order), and the names set."""
    table = {f.name: f for f in fields(spec)}

    def field_of(key: str, source: str) -> Field[Any]:
        name = key.strip().replace("-", "_")
        if name not in table:
            raise UsageError(f"{source}: unknown option {key!r}; valid options are {', '.join(sorted(table))}")
        return table[name]

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        try:
            import tomllib  # Python >= 3.11
        except ModuleNotFoundError as e:  # pragma: no cover - Python 3.10
            raise UsageError("--config needs Python >= 3.11 (tomllib); use --set key=value instead") from e
        try:
            loaded = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--config {path}: not valid TOML ({e})") from e
        for key, value in loaded.items():
            f = field_of(key, f"--config {path.name}")
            values[f.name] = _coerce(f, value, f"--config {path.name}")
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected key=value, e.g. --set lr=0.01")
        key, value = item.split("=", 1)
        f = field_of(key, "--set")
        values[f.name] = _coerce(f, value, f"--set {key}")
    for name in table:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return values, set(values)
