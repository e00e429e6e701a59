"""Command-line flags generated from config dataclasses, so no flag is ever copied by hand.

`add_config_args(parser, VisionConfig, prefix="vision")` adds `--vision-image-size` etc. with
the field's default and type; `config_from_args(args, VisionConfig, "vision")` builds it back,
after checking each value against the range its field declares (minivlm/ranges.py), so a bad
value stops the script at once with one line naming the flag. Booleans become `--flag` /
`--no-flag`. `only=` takes a few of a config's fields (demo.py's three seg options), and
`config_flags` turns a built config back into its flags, to hand it to another script.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from minivlm.ranges import check_value, field_range


def _flag(prefix: str, name: str) -> str:
    return "--" + (f"{prefix}_" if prefix else "").replace("_", "-") + name.replace("_", "-")


def _dest(prefix: str, name: str) -> str:
    return (f"{prefix}_" if prefix else "") + name


def _fields(config_class, only: tuple[str, ...] | None) -> list[dataclasses.Field]:
    """The init fields of `config_class` (those in `only`, when given) that have flags: the
    plain kinds add_config_args makes flags for."""
    hints = typing.get_type_hints(config_class)
    fields = [f for f in dataclasses.fields(config_class)
              if f.init and hints[f.name] in (bool, int, float, str)]
    if only is not None:
        if unknown := set(only) - {f.name for f in fields}:
            raise TypeError(f"{config_class.__name__} has no field {', '.join(sorted(unknown))}")
        fields = [f for f in fields if f.name in only]
    return fields


def add_config_args(parser: argparse.ArgumentParser, config_class, prefix: str = "",
                    defaults: dict | None = None, only: tuple[str, ...] | None = None) -> None:
    """One flag per init field of `config_class` (or of those in `only`); `defaults` overrides
    the dataclass defaults (a stage script uses it to change, say, the learning rate it starts
    from)."""
    hints = typing.get_type_hints(config_class)
    group = parser.add_argument_group(prefix or config_class.__name__)
    for f in _fields(config_class, only):
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


def checked_values(args: argparse.Namespace, config_class, prefix: str = "",
                   only: tuple[str, ...] | None = None) -> dict:
    """The parsed values of `config_class`'s flags, each checked against its field's range."""
    values = {}
    for f in _fields(config_class, only):
        if hasattr(args, _dest(prefix, f.name)):
            values[f.name] = getattr(args, _dest(prefix, f.name))
            check_value(_flag(prefix, f.name), values[f.name], f)
    return values


def config_from_args(args: argparse.Namespace, config_class, prefix: str = "",
                     only: tuple[str, ...] | None = None, **extra):
    """`config_class` from its parsed flags; the fields without one (not in `only`, or in
    `extra`) keep their defaults or take `extra`'s values."""
    return config_class(**checked_values(args, config_class, prefix, only), **extra)


def config_values(config, prefix: str = "", only: tuple[str, ...] | None = None) -> dict:
    """A built config's values under its flags' argparse names: {"seg_head": "sam", ...}."""
    return {_dest(prefix, f.name): getattr(config, f.name) for f in _fields(type(config), only)}


def config_flags(config, prefix: str = "", only: tuple[str, ...] | None = None) -> list[str]:
    """The command line that `add_config_args` parses back into `config` (these fields of it):
    `["--seg-head", "sam", "--seg-prompt", "predicting"]`, a boolean as `--flag`/`--no-flag`."""
    flags = []
    for f in _fields(type(config), only):
        value = getattr(config, f.name)
        if isinstance(value, bool):  # BooleanOptionalAction's pair: --seg-enabled, --no-seg-enabled
            flags.append(_flag(prefix, f.name) if value else "--no-" + _flag(prefix, f.name)[2:])
        else:
            flags += [_flag(prefix, f.name), str(value)]
    return flags


def underscore_aliases(argv: list[str]) -> list[str]:
    """Accept `--model_path` for `--model-path` (scripts that users already have use them)."""
    return [a.replace("_", "-") if a.startswith("--") and "=" not in a else
            a.split("=", 1)[0].replace("_", "-") + "=" + a.split("=", 1)[1]
            if a.startswith("--") else a for a in argv]
