"""Command-line flags generated from config dataclasses, so no flag is ever copied by hand.

`add_config_args(parser, VisionConfig, prefix="vision")` adds `--vision-image-size` etc. with
the field's default and type; `config_from_args(args, VisionConfig, "vision")` builds it back,
after checking each value against the range its field declares (minivlm/ranges.py), so a bad
value stops the script at once with one line naming the flag. Booleans become `--flag` /
`--no-flag`.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from minivlm.ranges import check_value, field_range


def _flag(prefix: str, name: str) -> str:
    return "--" + (f"{prefix}-" if prefix else "") + name.replace("_", "-")


def _dest(prefix: str, name: str) -> str:
    return (f"{prefix}_" if prefix else "") + name


def add_config_args(parser: argparse.ArgumentParser, config_class, prefix: str = "",
                    defaults: dict | None = None) -> None:
    """One flag per init field of `config_class`; `defaults` overrides the dataclass defaults
    (a stage script uses it to change, say, the learning rate it starts from)."""
    hints = typing.get_type_hints(config_class)
    group = parser.add_argument_group(prefix or config_class.__name__)
    for f in dataclasses.fields(config_class):
        if not f.init:
            continue
        if defaults and f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()
        kind = hints[f.name]
        flag, dest = _flag(prefix, f.name), _dest(prefix, f.name)
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=default)
        elif kind in (int, float, str):
            allowed = field_range(f)
            group.add_argument(flag, dest=dest, type=kind, default=default,
                               metavar=kind.__name__.upper(),
                               help=str(allowed) if allowed else None)


def set_config_defaults(parser: argparse.ArgumentParser, prefix: str, values: dict) -> None:
    """New defaults for flags that `add_config_args` made (a preset's sizes): a flag the user
    gives still wins when the parser runs again."""
    parser.set_defaults(**{_dest(prefix, name): value for name, value in values.items()})


def checked_values(args: argparse.Namespace, config_class, prefix: str = "") -> dict:
    """The parsed values of `config_class`'s flags, each checked against its field's range."""
    values = {}
    for f in dataclasses.fields(config_class):
        if f.init and hasattr(args, _dest(prefix, f.name)):
            values[f.name] = getattr(args, _dest(prefix, f.name))
            check_value(_flag(prefix, f.name), values[f.name], f)
    return values


def config_from_args(args: argparse.Namespace, config_class, prefix: str = "", **extra):
    return config_class(**checked_values(args, config_class, prefix), **extra)


def underscore_aliases(argv: list[str]) -> list[str]:
    """Accept `--model_path` for `--model-path` (scripts that users already have use them)."""
    return [a.replace("_", "-") if a.startswith("--") and "=" not in a else
            a.split("=", 1)[0].replace("_", "-") + "=" + a.split("=", 1)[1]
            if a.startswith("--") else a for a in argv]
