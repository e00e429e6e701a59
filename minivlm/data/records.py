"""What every reader shares: JSON(L) files to located records, checked fields, and the loop that
turns records into samples, raising or collecting one-line errors (rules in `readers.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from minivlm.data.sample import Sample, check_sample

Converter = Callable[[object, str, Path], Sample]  # (record, location, image_dir) -> Sample


def get_field(record: object, key: str, types: type | tuple, where: str,
              default: object = ...) -> object:
    """record[key], checked to be one of `types`; a missing key is an error unless a default is
    given."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if key not in record:
        if default is not ...:
            return default
        raise ValueError(f"{where}: missing key '{key}'")
    value = record[key]
    allowed = types if isinstance(types, tuple) else (types,)
    # True is an int in Python, but never a count or an id in the data.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ValueError(f"{where}: '{key}' should be {names}, found {type(value).__name__}")
    return value


def string_list(value: str | list, key: str, where: str) -> list[str]:
    """A field that may hold one string or a list of strings, as a list of non-empty strings."""
    items = [value] if isinstance(value, str) else value
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ValueError(f"{where}: '{key}'[{i}] should be a non-empty string, "
                             f"found {item!r:.60}")
    return items


def extra_fields(record: dict, used: tuple[str, ...]) -> dict:
    """Keys a format does not define (e.g. the synthetic world's question_type) travel in meta."""
    return {k: v for k, v in record.items() if k not in used}


def read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # LISA's fallback for ReasonSeg's labelme files, some of which are not UTF-8.
        return raw.decode("cp1252", errors="replace")


def read_records(path: Path) -> list[tuple[str, object]]:
    """(location, parsed record) pairs; a JSONL line that is not JSON becomes a ValueError record
    (so one bad line is skipped like any other bad record)."""
    text = read_text(path)
    if path.suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                where = f"{path}:{line_number}"
                try:
                    records.append((where, json.loads(line)))
                except json.JSONDecodeError as error:
                    records.append((where, ValueError(
                        f"{where}: invalid JSON ({error.msg} at column {error.colno})")))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error.msg} at line {error.lineno} "
                         f"column {error.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return [(f"{path}:{index}", record) for index, record in enumerate(data)]


def convert_all(records: list[tuple[str, object]], convert: Converter, image_dir: Path,
                errors: list[str] | None) -> list[Sample]:
    """Every record through `convert` and `check_sample`. A bad record raises, or, when `errors`
    is a list, has its message appended there and is left out."""
    samples = []
    for where, record in records:
        try:
            if isinstance(record, ValueError):
                raise record
            sample = convert(record, where, image_dir)
            check_sample(sample)
        except ValueError as error:  # ImageError is a ValueError too
            if errors is None:
                raise
            errors.append(str(error))
        else:
            samples.append(sample)
    return samples
