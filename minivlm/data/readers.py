"""Readers for the four on-disk formats. Each turns a file (or folder) into list[Sample].

  read_llava_json      [{"id", "image": str | [str], "conversations": [{"from", "value"}]}]
  read_messages_jsonl  one {"messages": [{"role", "content"}], "images": [...]} per line
  read_chiron_eval     [{"id", "img_name": str | [str], "question", "reasoning", "answer", "answer_type"}]
  read_reasonseg_dir   LISA's ReasonSeg folder: NAME.jpg + labelme NAME.json
  read_dataset         picks one of the above from the path and the record keys

Rules shared by every reader:
  - Image paths. Absolute paths are used as given. A relative path p is looked up as
    image_dir/p, then image_dir/images/p; the first that exists wins. image_dir defaults
    to the data file's folder. The second place is what lets the Chiron-o1 demo JSONL
    (paths like "169992/ct_group1/0.png", files under demo's images/ folder) load as is.
    Files are checked to exist, not decoded (that happens in the data loader).
  - Placeholders. A record with N images must have N "<image>" in its text. If its text has
    none (the messages JSONL convention), N "<image>\\n" are prepended to the first user turn;
    any other count is an error.
  - Locations. "file.json:17" is entry 17 (0-based) of the top-level list; "file.jsonl:17"
    is line 17 (1-based, as editors count); ReasonSeg names "folder/NAME.json".
  - Errors. A bad record raises ValueError("location: problem") on one line. Pass a list as
    `errors` to skip bad records instead: each message is appended to it, the good samples
    are returned. (One design for all readers; the caller decides how loud to be.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from minivlm.constants import FINAL_ANSWER_PREFIX, IMAGE_TOKEN, MASK_IGNORE, SEG_TOKEN
from minivlm.data.images import image_size
from minivlm.data.sample import Sample, check_sample

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
REASONSEG_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# LISA's validation prompts (ValDataset), and one of its answer templates.
REASONSEG_SENTENCE_PROMPT = IMAGE_TOKEN + "\n{text} Please output segmentation mask."
REASONSEG_PHRASE_PROMPT = IMAGE_TOKEN + "\nWhat is {text} in this image? Please output segmentation mask."
REASONSEG_ANSWER = f"Sure, it is {SEG_TOKEN}."

Converter = Callable[[object, str, Path], Sample]


# ---------------------------------------------------------------------------- small checks
def _get(record: object, key: str, types: type | tuple, where: str, default: object = ...) -> object:
    """record[key], checked to be one of `types`; a missing key is an error unless a default is given."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if key not in record:
        if default is not ...:
            return default
        raise ValueError(f"{where}: missing key '{key}'")
    value = record[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):  # True is an int
        names = " or ".join(t.__name__ for t in allowed)
        raise ValueError(f"{where}: '{key}' should be {names}, found {type(value).__name__}")
    return value


def _string_list(value: str | list, key: str, where: str) -> list[str]:
    """A field that may hold one string or a list of strings, as a list of non-empty strings."""
    items = [value] if isinstance(value, str) else value
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ValueError(f"{where}: '{key}'[{i}] should be a non-empty string, found {item!r:.60}")
    return items


def _resolve_image(name: str, image_dir: Path, where: str) -> Path:
    candidates = [Path(name)] if Path(name).is_absolute() else [image_dir / name, image_dir / "images" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(f"{where}: image '{name}' not found (looked for {' and '.join(map(str, candidates))})")


def _add_placeholders(turns: list[dict], num_images: int, where: str) -> list[dict]:
    """Prepend one placeholder per image to the first user turn when the text has none."""
    found = sum(t["content"].count(IMAGE_TOKEN) for t in turns)
    if found == 0 and num_images > 0:
        first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"{where}: {num_images} image(s) but no user turn to put them in")
        turns = [dict(t) for t in turns]
        turns[first_user]["content"] = (IMAGE_TOKEN + "\n") * num_images + turns[first_user]["content"]
    elif found != num_images:
        raise ValueError(f"{where}: {found} {IMAGE_TOKEN} placeholder(s) in the text "
                         f"but {num_images} image(s) listed")
    return turns


def _extras(record: dict, used: tuple[str, ...]) -> dict:
    """Keys a format does not define (e.g. the synthetic world's question_type) travel in meta."""
    return {k: v for k, v in record.items() if k not in used}


# ---------------------------------------------------------------------------- files -> records
def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # LISA's fallback for ReasonSeg's labelme files


def _read_records(path: Path) -> list[tuple[str, object]]:
    """(location, parsed record) pairs; a JSONL line that is not JSON becomes a ValueError record."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                where = f"{path}:{line_number}"
                try:
                    records.append((where, json.loads(line)))
                except json.JSONDecodeError as error:
                    records.append((where, ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno})")))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return [(f"{path}:{index}", record) for index, record in enumerate(data)]


def _convert_all(records: list[tuple[str, object]], convert: Converter, image_dir: Path,
                 errors: list[str] | None) -> list[Sample]:
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


def _read_file(path: str | Path, image_dir: str | Path | None, convert: Converter,
               errors: list[str] | None) -> list[Sample]:
    path = Path(path)
    records = _read_records(path)
    return _convert_all(records, convert, Path(image_dir) if image_dir is not None else path.parent, errors)


# ---------------------------------------------------------------------------- record converters
def _llava_record(record: object, where: str, image_dir: Path) -> Sample:
    conversations = _get(record, "conversations", list, where)
    turns = []
    for i, message in enumerate(conversations):
        at = f"{where}: conversations[{i}]"
        speaker = _get(message, "from", str, at)
        if speaker not in LLAVA_ROLES:
            raise ValueError(f"{at}: 'from' should be one of {sorted(LLAVA_ROLES)}, found '{speaker}'")
        turns.append({"role": LLAVA_ROLES[speaker], "content": _get(message, "value", str, at)})
    names = _string_list(_get(record, "image", (str, list), where, default=[]), "image", where)
    turns = _add_placeholders(turns, len(names), where)
    images = [_resolve_image(name, image_dir, where) for name in names]
    meta = {"task": "chat", **_extras(record, ("image", "conversations"))}
    return Sample(images=images, turns=turns, source=where, meta=meta)


def _messages_record(record: object, where: str, image_dir: Path) -> Sample:
    messages = _get(record, "messages", list, where)
    turns = []
    for i, message in enumerate(messages):
        role = _get(message, "role", str, f"{where}: messages[{i}]")
        turns.append({"role": role, "content": _get(message, "content", str, f"{where}: messages[{i}]")})
    names = _string_list(_get(record, "images", (str, list), where, default=[]), "images", where)
    turns = _add_placeholders(turns, len(names), where)
    images = [_resolve_image(name, image_dir, where) for name in names]
    meta = {"task": "chat", **_extras(record, ("messages", "images"))}
    return Sample(images=images, turns=turns, source=where, meta=meta)


def _chiron_record(record: object, where: str, image_dir: Path) -> Sample:
    record_id = _get(record, "id", (int, str), where)
    names = _string_list(_get(record, "img_name", (str, list), where), "img_name", where)
    question = _get(record, "question", str, where)
    answer = _get(record, "answer", str, where)
    answer_type = _get(record, "answer_type", str, where)
    reasoning = _get(record, "reasoning", str, where, default="")
    # The reference response as Chiron-o1 is trained to write it: reasoning, then the marked answer.
    response = (reasoning.rstrip() + "\n" if reasoning.strip() else "") + FINAL_ANSWER_PREFIX + answer
    turns = _add_placeholders([{"role": "user", "content": question}, {"role": "assistant", "content": response}],
                              len(names), where)
    images = [_resolve_image(name, image_dir, where) for name in names]
    meta = {"task": "vqa", **_extras(record, ("question",)), "id": record_id, "answer": answer,
            "answer_type": answer_type, "img_name": names, "reasoning": reasoning}
    return Sample(images=images, turns=turns, source=where, meta=meta)


# ---------------------------------------------------------------------------- ReasonSeg
def polygons_to_mask(shapes: list, width: int, height: int, where: str = "") -> np.ndarray:
    """Rasterise labelme polygons to an (H, W) uint8 mask as LISA's get_mask_from_json does.

    Label "flag" (any case) is skipped, a label containing "ignore" paints 255, any other 1.
    Points are truncated to int (LISA: np.array(points, dtype=np.int32)). Polygons are drawn
    largest first, so a small region inside a larger one stays visible on top (ties: later
    shape first, as LISA's np.argsort(area)[::-1]). Each polygon is filled with its 1-px
    outline (fillPoly + polylines in LISA). Points outside the image are clipped by drawing;
    a polygon with no pixel inside the image, fewer than 3 points, or no target polygon at
    all is an error.
    """
    polygons = []  # (area, index, value, points)
    for k, shape in enumerate(shapes):
        at = f"{where}: shapes[{k}]"
        label = _get(shape, "label", str, at)
        if label.lower() == "flag":
            continue
        points = _get(shape, "points", list, at)
        if len(points) < 3:
            raise ValueError(f"{at} ('{label}'): polygon with {len(points)} point(s), need at least 3")
        for point in points:
            if not (isinstance(point, list) and len(point) == 2 and all(_is_number(c) for c in point)):
                raise ValueError(f"{at} ('{label}'): each point should be [x, y] numbers, found {point!r:.60}")
        corners = [(int(x), int(y)) for x, y in points]
        value = MASK_IGNORE if "ignore" in label.lower() else 1
        area = int(_draw([corners], [1], width, height).sum())
        if area == 0:
            raise ValueError(f"{at} ('{label}'): polygon covers no pixel of the {width}x{height} image")
        polygons.append((area, k, value, corners))
    if not any(value == 1 for _, _, value, _ in polygons):
        raise ValueError(f"{where}: no target polygon (only 'flag'/'ignore' shapes)")
    polygons.sort(key=lambda p: (p[0], p[1]), reverse=True)
    return _draw([p[3] for p in polygons], [p[2] for p in polygons], width, height)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _draw(polygons: list[list[tuple[int, int]]], values: list[int], width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for corners, value in zip(polygons, values):
        draw.polygon(corners, fill=value, outline=value)
    return np.array(canvas)  # (H, W) uint8


def _reasonseg_record(stem_path: object, where: str, image_dir: Path) -> Sample:
    json_path = Path(str(stem_path) + ".json")
    image_path = next((p for s in REASONSEG_IMAGE_SUFFIXES if (p := Path(str(stem_path) + s)).is_file()), None)
    if not json_path.is_file():
        raise ValueError(f"{where}: image {image_path.name} has no annotation file {json_path.name}")
    if image_path is None:
        raise ValueError(f"{where}: no image next to it (looked for {json_path.stem} with suffix "
                         f"{' or '.join(REASONSEG_IMAGE_SUFFIXES)})")
    try:
        annotation = json.loads(_read_text(json_path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error.msg} at line {error.lineno})") from None
    shapes = _get(annotation, "shapes", list, where)
    texts = _string_list(_get(annotation, "text", (str, list), where), "text", where)
    if not texts:
        raise ValueError(f"{where}: 'text' is empty, expected at least one referring text")
    is_sentence = _get(annotation, "is_sentence", bool, where)
    width, height = image_size(image_path)
    mask = polygons_to_mask(shapes, width, height, where)
    prompt = REASONSEG_SENTENCE_PROMPT if is_sentence else REASONSEG_PHRASE_PROMPT
    # Our extension: an optional "answer" that names the object before its [SEG] ("Sure, it is
    # the blue circle [SEG]."), so the language model resolves the reference in words first.
    answer = _get(annotation, "answer", str, where, default=REASONSEG_ANSWER)
    if answer.count(SEG_TOKEN) != 1:
        raise ValueError(f"{where}: 'answer' must contain exactly one {SEG_TOKEN}, found {answer!r}")
    turns = [{"role": "user", "content": prompt.format(text=texts[0])},
             {"role": "assistant", "content": answer}]
    meta = {"task": "reason_seg", "id": json_path.stem, "texts": texts, "is_sentence": is_sentence,
            **_extras(annotation, ("shapes", "text", "is_sentence", "imageData", "answer"))}
    return Sample(images=[image_path], turns=turns, masks=[mask], source=where, meta=meta)


def expand_referring_texts(samples: list[Sample]) -> list[Sample]:
    """One sample per referring text of each ReasonSeg sample (LISA draws one at random each
    time; for training, every phrasing of the same target is more data)."""
    out = []
    for sample in samples:
        texts = sample.meta.get("texts", []) if sample.meta.get("task") == "reason_seg" else []
        if len(texts) < 2:
            out.append(sample)
            continue
        prompt = (REASONSEG_SENTENCE_PROMPT if sample.meta["is_sentence"]
                  else REASONSEG_PHRASE_PROMPT)
        for text in texts:
            turns = [{"role": "user", "content": prompt.format(text=text)}] + sample.turns[1:]
            out.append(Sample(images=sample.images, turns=turns, masks=sample.masks,
                              source=sample.source, meta=sample.meta))
    return out


# ---------------------------------------------------------------------------- public readers
def read_llava_json(path: str | Path, image_dir: str | Path | None = None,
                    errors: list[str] | None = None) -> list[Sample]:
    return _read_file(path, image_dir, _llava_record, errors)


def read_messages_jsonl(path: str | Path, image_dir: str | Path | None = None,
                        errors: list[str] | None = None) -> list[Sample]:
    return _read_file(path, image_dir, _messages_record, errors)


def read_chiron_eval(path: str | Path, image_dir: str | Path | None = None,
                     errors: list[str] | None = None) -> list[Sample]:
    return _read_file(path, image_dir, _chiron_record, errors)


def read_reasonseg_dir(directory: str | Path, errors: list[str] | None = None) -> list[Sample]:
    """Every NAME.json + NAME.jpg pair in `directory` (not recursive), sorted by NAME."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory (expected a ReasonSeg split folder)")
    suffixes = (".json",) + REASONSEG_IMAGE_SUFFIXES
    stems = sorted({p.with_suffix("") for p in directory.iterdir() if p.suffix in suffixes})
    records = [(str(stem) + ".json", stem) for stem in stems]
    return _convert_all(records, _reasonseg_record, directory, errors)


def read_dataset(path: str | Path, image_dir: str | Path | None = None,
                 errors: list[str] | None = None) -> list[Sample]:
    """Read any supported format: a folder is ReasonSeg; a file's format comes from its record keys."""
    path = Path(path)
    if path.is_dir():
        return read_reasonseg_dir(path, errors)
    records = _read_records(path)
    first = next((record for _, record in records if isinstance(record, dict)), None)
    if first is None:
        return _convert_all(records, _llava_record, path.parent, errors)  # empty (or only bad lines)
    if "conversations" in first:
        convert = _llava_record
    elif "messages" in first:
        convert = _messages_record
    elif "question" in first and "img_name" in first:
        convert = _chiron_record
    else:
        raise ValueError(f"{path}: cannot tell the format from the record keys {sorted(first)}; expected "
                         "'conversations' (LLaVA), 'messages' (messages JSONL) or 'question' + 'img_name' (Chiron-o1)")
    return _convert_all(records, convert, Path(image_dir) if image_dir is not None else path.parent, errors)
