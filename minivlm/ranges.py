"""Allowed values of config fields: declared next to the field, checked in one place.

    batch_size: int = field(default=16, metadata=at_least(1))
    lr: float = field(default=1e-3, metadata=above(0))
    head: str = field(default="sam", metadata=one_of("sam", "dot"))
A config's `__post_init__` calls `check_ranges(self)`; `cli.config_from_args` checks the same
ranges first so that its message names the flag: "--batch-size must be >= 1, got 0". Without
this, `--batch-size -3` hung forever and `--grad-accum 0` trained nothing and saved the result.
tests/test_reliability_flags.py makes sure every int and float field of every flag-parsed config
declares a range, so a new field cannot forget one.
"""
from __future__ import annotations

import dataclasses
import math

RANGE = "range"  # the key in a dataclass field's metadata


@dataclasses.dataclass(frozen=True)
class Range:
    low: float | None = None  # None: unbounded
    high: float | None = None
    low_open: bool = False  # True: value > low, not >= low
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False  # nan compares false to everything; inf is never a useful setting
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, "
                f"{self.high:g}{')' if self.high_open else ']'}")


@dataclasses.dataclass(frozen=True)
class Choices:
    """The allowed values of a string field (an option with named choices)."""

    values: tuple[str, ...]

    def __contains__(self, value) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return "one of " + ", ".join(self.values)


def one_of(*values: str) -> dict:
    return {RANGE: Choices(values)}


def at_least(low: float) -> dict:
    return {RANGE: Range(low)}


def above(low: float) -> dict:
    return {RANGE: Range(low, low_open=True)}


def between(low: float, high: float, high_open: bool = False) -> dict:
    return {RANGE: Range(low, high, high_open=high_open)}


def field_range(f: dataclasses.Field) -> Range | Choices | None:
    return f.metadata.get(RANGE)


def check_value(name: str, value, f: dataclasses.Field) -> None:
    """Raise a one-line ValueError if `value` is outside `f`'s declared range."""
    allowed = field_range(f)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_ranges(config) -> None:
    """Every init field of a config dataclass instance against its declared range (derived
    fields are not set yet when `__post_init__` calls this)."""
    for f in dataclasses.fields(config):
        if f.init:
            check_value(f"{type(config).__name__}.{f.name}", getattr(config, f.name), f)
