"""The unit every reader yields: one conversation about zero or more images (and masks).

A `Sample` is format-free. Whatever the file looked like (LLaVA JSON, messages JSONL,
Chiron-o1 eval, ReasonSeg labelme), the rest of the pipeline sees the same three things:
the image paths, the chat turns with one "<image>" placeholder per image (in image order),
and one (H, W) mask per "[SEG]" the assistant says (in order; a MaskSource until an item decodes
it, data/masks.py).

Below the Sample, what every reader shares on the way to one: JSON(L) files to located records,
parsed one at a time (json_stream.py), checked fields, and the loop that turns records into
samples, raising or collecting one-line errors (the formats themselves are in readers.py and
reasonseg.py). Records and samples are generators, so a training set streams from its file into
the dataset's compact arrays (batch.py) without ever being held as Python objects whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from minivlm.constants import IMAGE_TOKEN, MASK_VALUES, ROLES, SEG_TOKEN
from minivlm.data.json_stream import iter_json_array, iter_jsonl
from minivlm.data.masks import MaskSource


@dataclass
class Sample:
    images: list[Path]  # resolved image paths, in placeholder order
    turns: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}]
    # one per [SEG]: an (H, W) uint8 array, or a MaskSource decoded per item (data/masks.py)
    masks: list[MaskSource | np.ndarray] = field(default_factory=list)
    source: str = ""  # "path/to/file.json:17", used in every error message
    meta: dict = field(default_factory=dict)  # id, answer, answer_type, task, ...


def check_sample(sample: Sample) -> None:
    """Raise a one-line ValueError (prefixed with `sample.source`) if the sample breaks the
    contract.

    Readers call this on every record; code that builds samples on the fly can call it too.
    """
    where = sample.source or "<sample>"
    if not isinstance(sample.turns, list) or not sample.turns:
        raise ValueError(f"{where}: expected a non-empty list of turns")
    for i, turn in enumerate(sample.turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise ValueError(f"{where}: turn {i}: expected a role in {ROLES}, found {turn!r:.80}")
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: turn {i}: expected string content, "
                             f"found {type(turn.get('content')).__name__}")
    roles = [t["role"] for t in sample.turns]
    if "user" not in roles or "assistant" not in roles:
        raise ValueError(f"{where}: expected at least one user and one assistant turn, "
                         f"found roles {roles}")

    # The model splices image i's embeddings at the i-th placeholder: counts must agree exactly.
    num_placeholders = sum(t["content"].count(IMAGE_TOKEN) for t in sample.turns)
    if num_placeholders != len(sample.images):
        raise ValueError(
            f"{where}: {num_placeholders} {IMAGE_TOKEN} placeholder(s) in the text "
            f"but {len(sample.images)} image(s) listed"
        )
    if any(IMAGE_TOKEN in t["content"] for t in sample.turns if t["role"] == "assistant"):
        raise ValueError(f"{where}: {IMAGE_TOKEN} in an assistant turn "
                         "(images belong to user turns)")

    # The mask loss pairs the hidden state at the k-th [SEG] with the k-th mask.
    num_seg = sum(t["content"].count(SEG_TOKEN) for t in sample.turns if t["role"] == "assistant")
    if num_seg != len(sample.masks):
        raise ValueError(f"{where}: {num_seg} {SEG_TOKEN} in the answer(s) "
                         f"but {len(sample.masks)} mask(s)")
    for k, mask in enumerate(sample.masks):
        if isinstance(mask, MaskSource):  # values are its reader's to check, when it reads it
            if len(mask.shape) != 2:
                raise ValueError(f"{where}: mask {k}: expected an (H, W) shape, found "
                                 f"{mask.shape}")
            continue
        if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.uint8:
            raise ValueError(f"{where}: mask {k}: expected an (H, W) uint8 array")
        # The mask losses would read any other value as background without a word (the IoU
        # refuses it, but only at eval time): stop at the record instead.
        unexpected = np.setdiff1d(np.unique(mask), MASK_VALUES)
        if unexpected.size:
            raise ValueError(f"{where}: mask {k}: expected pixel values in {MASK_VALUES} "
                             f"(background, object, ignore), found {unexpected[:5].tolist()}")


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


def iter_records(path: Path) -> Iterator[tuple[str, object]]:
    """(location, parsed record) pairs, parsed one at a time (json_stream.py): a JSON array is
    never held whole. A JSONL line that is not JSON becomes a ValueError record (so one bad line
    is skipped like any other bad record); a JSON file that is not a list of records raises."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        for line_number, record in iter_jsonl(path):
            yield f"{path}:{line_number}", record
    else:
        for index, record in iter_json_array(path):
            yield f"{path}:{index}", record


def read_records(path: Path) -> list[tuple[str, object]]:
    """iter_records as a list, for the small files read whole (an explanatory file, eval data)."""
    return list(iter_records(path))


def iter_converted(records: Iterable[tuple[str, object]], convert: Converter, image_dir: Path,
                   errors: list[str] | None) -> Iterator[Sample]:
    """Every record through `convert` and `check_sample`, one at a time. A bad record raises, or,
    when `errors` is a list, has its message appended there and is left out."""
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
            yield sample


def convert_all(records: Iterable[tuple[str, object]], convert: Converter, image_dir: Path,
                errors: list[str] | None) -> list[Sample]:
    """iter_converted as a list."""
    return list(iter_converted(records, convert, image_dir, errors))
