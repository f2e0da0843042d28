"""Command-line flags generated from the option dataclasses, and the three sources of a value.

Every option field of :class:`~descend._options.RunSpec` / :class:`~descend._options.CompareSpec`
becomes a flag (``batch_size`` -> ``--batch-size``), a key of a ``--config`` TOML file and a
``--set key=value`` target, with the metavar, choices, help and default of its
:class:`~descend._options.Option`. Precedence, lowest first: the default, the TOML file, ``--set``,
explicit flags. Values are converted here; a ``--config``/``--set`` value is also checked here (a wrong type or
range in the file is an error even when a flag overrides it), and every value once more when the spec is built.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from descend._options import GROUPS, Option, OptionError, option_fields

__all__ = ["UsageError", "add_options", "collect", "converter"]

_NONE = {"none", "null"}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class UsageError(OptionError):
    """The command line or configuration is malformed."""


def converter(option: Option) -> Callable[[str], Any]:
    """Text -> value for ``option`` (``none``/``null`` for a nullable option; empty text is refused)."""

    def convert(text: str) -> Any:
        low = text.strip().lower()
        if not low:
            raise argparse.ArgumentTypeError(f"empty value; give {_what(option)}")
        if option.nullable and low in _NONE:
            return None
        if low in option.aliases:
            return option.aliases[low]
        if option.kind is bool:
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if option.kind is int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if option.kind is float:
            try:
                return float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        return text.strip()

    convert.__name__ = option.kind.__name__  # argparse names the type in its messages
    return convert


def _what(option: Option) -> str:
    words = {int: "an integer", float: "a number", str: "a value", bool: "true or false"}[option.kind]
    extra = [*option.aliases, *(["none"] if option.nullable else [])]
    return words + (f" (or {', '.join(extra)})" if extra else "")


def help_text(option: Option) -> str:
    """The help line of ``option``: what it is, its choices, and its default, once."""
    text = option.help
    if option.choices is not None:
        text += f"; one of {', '.join(option.choices)}"
    elif option.kind is not bool and option.range_text():
        text += f"; {option.range_text()}"
    return f"{text} (default: {option.default_text()})".replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, spec: type) -> None:
    """One flag per option field of the dataclass ``spec``, in argument groups; absent flags stay absent."""
    groups: dict[str, Any] = {}
    for f, option in option_fields(spec):
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(GROUPS.get(option.group, option.group))
        group = groups[option.group]
        if option.kind is bool:
            group.add_argument(
                option.flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text(option),
            )
        else:
            group.add_argument(
                option.flag,
                dest=f.name,
                type=converter(option),
                default=argparse.SUPPRESS,
                metavar=option.metavar or "VALUE",
                help=help_text(option),
            )


def _coerce(option: Option, value: Any, source: str) -> Any:
    """A ``--config``/``--set`` value for ``option``, validated now: text goes through the converter, then
    every value through the option's one check, so a bad value is refused even when a flag overrides it."""
    if isinstance(value, str):
        try:
            value = converter(option)(value)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{source}: bad value for {option.name}: {e}") from e
    try:
        return option.check(value)
    except OptionError as e:
        raise UsageError(f"{source}: {e}") from None


def collect(spec: type, args: argparse.Namespace) -> tuple[dict[str, Any], set[str]]:
    """The option values from ``--config``, ``--set`` and flags (in that order), and the names set."""
    table = {f.name: option for f, option in option_fields(spec)}

    def option_named(key: str, source: str) -> Option:
        name = key.strip().replace("-", "_")
        if name not in table:
            raise UsageError(f"{source}: unknown option {key!r}; valid options are {', '.join(sorted(table))}")
        return table[name]

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        import tomllib

        try:
            loaded = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--config {path}: not valid TOML ({e})") from e
        for key, value in loaded.items():
            option = option_named(key, f"--config {path.name}")
            if isinstance(value, dict):
                raise UsageError(f"--config {path.name}: {key} must be a value, not a table (keys are flat)")
            values[option.name] = _coerce(option, value, f"--config {path.name}")
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected key=value, e.g. --set lr=0.01")
        key, value = item.split("=", 1)
        option = option_named(key, "--set")
        values[option.name] = _coerce(option, value, f"--set {key}")
    for name in table:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return values, set(values)
