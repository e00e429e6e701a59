"""LISA's ReasonSeg format: a folder of NAME.jpg + labelme NAME.json, read into `Sample`s whose
masks are the polygons (a LabelmeMask, rasterised per item), with LISA's validation prompts and
answer.

    NAME.json  {"text": str | [str], "is_sentence": bool, "shapes": [{"label", "points"}],
                "answer": str (optional, ours: the assistant turn, with exactly one [SEG])}

With an explanatory file (SegDataConfig.explanatory_file, LISA's ReasonSeg/explanatory/
train.json: [{"image": "NAME.jpg", "query", "outputs", "json"}]), an image that has an explanation
gets one of LISA's three answer modes (reason_seg_dataset.py), drawn per record:
    text only (probability `explanatory`)   "<image>\n{text}"  ->  "{outputs}", no mask
    [SEG] + explanation (half the rest)     "<image>\n{text} Please output segmentation mask and
                                            explain why."  ->  "Sure, it is [SEG]. {outputs}"
    [SEG] only (the other half)             the sample as without the file
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from minivlm.constants import IMAGE_TOKEN, MASK_IGNORE, SEG_TOKEN
from minivlm.data.images import image_size
from minivlm.data.lisa_templates import (SEG_AND_EXPLANATION, SEG_ONLY, TEXT_ONLY,
                                         explanatory_mode, explanatory_question, record_rng)
from minivlm.data.masks import MaskSource
from minivlm.data.sample import (Sample, convert_all, extra_fields, get_field, read_records,
                                 read_text, string_list)
from minivlm.data.seg_data_config import SegDataConfig

REASONSEG_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# LISA's validation prompts (ValDataset), and one of its answer templates.
REASONSEG_SENTENCE_PROMPT = IMAGE_TOKEN + "\n{text} Please output segmentation mask."
REASONSEG_PHRASE_PROMPT = (IMAGE_TOKEN + "\nWhat is {text} in this image? "
                           "Please output segmentation mask.")
REASONSEG_ANSWER = f"Sure, it is {SEG_TOKEN}."


# ---------------------------------------------------------------------------- polygons
def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _draw(polygons: list, values: list[int], width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for corners, value in zip(polygons, values):  # corners: [(x, y), ...] or [x, y, x, y, ...]
        draw.polygon(corners, fill=value, outline=value)
    return np.array(canvas)  # (H, W) uint8


@dataclass(frozen=True, eq=False)
class LabelmeMask(MaskSource):
    """A ReasonSeg mask as its labelme file holds it: the polygons in drawing order, each a flat
    int32 array [x, y, x, y, ...] with its value (1 or 255)."""

    shape: tuple[int, int]  # (H, W)
    polygons: tuple[np.ndarray, ...]
    values: tuple[int, ...]

    def decode(self) -> np.ndarray:
        height, width = self.shape
        return _draw([p.tolist() for p in self.polygons], list(self.values), width, height)


def labelme_mask(shapes: list, width: int, height: int, where: str = "") -> LabelmeMask:
    """Labelme polygons as LISA's get_mask_from_json rasterises them, checked, not yet drawn.

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
        label = get_field(shape, "label", str, at)
        if label.lower() == "flag":
            continue
        points = get_field(shape, "points", list, at)
        if len(points) < 3:
            raise ValueError(f"{at} ('{label}'): polygon with {len(points)} point(s), "
                             f"need at least 3")
        for point in points:
            if not (isinstance(point, list) and len(point) == 2
                    and all(_is_number(c) for c in point)):
                raise ValueError(f"{at} ('{label}'): each point should be [x, y] numbers, "
                                 f"found {point!r:.60}")
        corners = [(int(x), int(y)) for x, y in points]
        value = MASK_IGNORE if "ignore" in label.lower() else 1
        area = int(_draw([corners], [1], width, height).sum())
        if area == 0:
            raise ValueError(f"{at} ('{label}'): polygon covers no pixel of the "
                             f"{width}x{height} image")
        polygons.append((area, k, value, corners))
    if not any(value == 1 for _, _, value, _ in polygons):
        raise ValueError(f"{where}: no target polygon (only 'flag'/'ignore' shapes)")
    polygons.sort(key=lambda p: (p[0], p[1]), reverse=True)
    return LabelmeMask((height, width),
                       tuple(np.asarray(p[3], dtype=np.int32).ravel() for p in polygons),
                       tuple(p[2] for p in polygons))


def polygons_to_mask(shapes: list, width: int, height: int, where: str = "") -> np.ndarray:
    """Rasterise labelme polygons to an (H, W) uint8 mask (`labelme_mask`'s rules)."""
    return labelme_mask(shapes, width, height, where).decode()


def count_clipped(shapes: list, width: int, height: int) -> int:
    """Drawn polygons (checked by polygons_to_mask) with a point outside the image, whose mask
    is therefore clipped. labelme coordinates run over [0, width] x [0, height]: a point on the
    far edge (x == width) is on the border, not outside."""
    return sum(1 for shape in shapes if shape["label"].lower() != "flag"
               and any(not (0 <= x <= width and 0 <= y <= height) for x, y in shape["points"]))


# ---------------------------------------------------------------------------- records
def _find_image(stem_path: Path) -> Path | None:
    candidates = (Path(str(stem_path) + suffix) for suffix in REASONSEG_IMAGE_SUFFIXES)
    return next((path for path in candidates if path.is_file()), None)


def _reasonseg_record(stem_path: object, where: str, image_dir: Path) -> Sample:
    json_path = Path(str(stem_path) + ".json")
    image_path = _find_image(Path(str(stem_path)))
    if not json_path.is_file():
        raise ValueError(f"{where}: image {image_path.name} has no annotation file "
                         f"{json_path.name}")
    if image_path is None:
        raise ValueError(f"{where}: no image next to it (looked for {json_path.stem} with suffix "
                         f"{' or '.join(REASONSEG_IMAGE_SUFFIXES)})")
    try:
        annotation = json.loads(read_text(json_path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error.msg} at line {error.lineno})") from None
    shapes = get_field(annotation, "shapes", list, where)
    texts = string_list(get_field(annotation, "text", (str, list), where), "text", where)
    if not texts:
        raise ValueError(f"{where}: 'text' is empty, expected at least one referring text")
    is_sentence = get_field(annotation, "is_sentence", bool, where)
    width, height = image_size(image_path)
    mask = labelme_mask(shapes, width, height, where)
    clipped = count_clipped(shapes, width, height)
    prompt = REASONSEG_SENTENCE_PROMPT if is_sentence else REASONSEG_PHRASE_PROMPT
    # Our extension: an optional "answer" that names the object before its [SEG] ("Sure, it is
    # the blue circle [SEG]."), so the language model resolves the reference in words first.
    answer = get_field(annotation, "answer", str, where, default=REASONSEG_ANSWER)
    if answer.count(SEG_TOKEN) != 1:
        raise ValueError(f"{where}: 'answer' must contain exactly one {SEG_TOKEN}, "
                         f"found {answer!r}")
    turns = [{"role": "user", "content": prompt.format(text=texts[0])},
             {"role": "assistant", "content": answer}]
    meta = {"task": "reason_seg", "id": json_path.stem, "texts": texts, "is_sentence": is_sentence,
            **extra_fields(annotation, ("shapes", "text", "is_sentence", "imageData", "answer"))}
    if clipped:
        meta["clipped_polygons"] = clipped
    return Sample(images=[image_path], turns=turns, masks=[mask], source=where, meta=meta)


def read_explanations(path: str | Path) -> dict[str, str]:
    """LISA's explanatory file: image file name -> its explanation ("outputs"); a later entry for
    the same image wins, as in LISA's dict."""
    explanations = {}
    for where, item in read_records(Path(path)):
        if isinstance(item, ValueError):
            raise item
        explanations[get_field(item, "image", str, where)] = get_field(item, "outputs", str, where)
    return explanations


def _explained(sample: Sample, explanation: str, rng, probability: float) -> Sample:
    """One of LISA's three answer modes for a sample whose image has an explanation."""
    mode = explanatory_mode(rng, probability)
    text = sample.meta["texts"][0]
    # LISA writes the text as it is in these two modes (no template, no lower-casing).
    if mode == SEG_AND_EXPLANATION:
        prompt = explanatory_question(rng, "{text}")
        answer = f"{sample.turns[1]['content']} {explanation}"
    elif mode == TEXT_ONLY:
        prompt, answer = IMAGE_TOKEN + "\n{text}", explanation
    else:
        return Sample(sample.images, sample.turns, sample.masks, sample.source,
                      {**sample.meta, "explanatory_mode": SEG_ONLY})
    turns = [{"role": "user", "content": prompt.format(text=text)},
             {"role": "assistant", "content": answer}]
    masks = [] if mode == TEXT_ONLY else sample.masks
    meta = {**sample.meta, "explanatory_mode": mode, "explanatory_prompt": prompt}
    return Sample(sample.images, turns, masks, sample.source, meta)


def read_reasonseg_dir(directory: str | Path, errors: list[str] | None = None,
                       seg_data: SegDataConfig | None = None) -> list[Sample]:
    """Every NAME.json + NAME.jpg pair in `directory` (not recursive), sorted by NAME; with
    `seg_data.explanatory_file`, LISA's explanatory answer modes (see the module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory (expected a ReasonSeg split folder)")
    suffixes = (".json",) + REASONSEG_IMAGE_SUFFIXES
    stems = sorted({p.with_suffix("") for p in directory.iterdir() if p.suffix in suffixes})
    records = [(str(stem) + ".json", stem) for stem in stems]
    convert = _reasonseg_record
    if seg_data is not None and seg_data.explanatory_file:
        explanations = read_explanations(seg_data.explanatory_file)
        index = {where: i for i, (where, _) in enumerate(records)}

        def convert(stem_path, where, image_dir):
            sample = _reasonseg_record(stem_path, where, image_dir)
            explanation = explanations.get(sample.images[0].name)
            if explanation is None:
                return sample
            rng = record_rng(seg_data.seed, index[where])
            return _explained(sample, explanation, rng, seg_data.explanatory)
    samples = convert_all(records, convert, directory, errors)
    # Clipping is what LISA does too, so it is no error; but many clipped polygons can mean
    # annotations drawn at another resolution than the images, which should not go unseen.
    clipped = [s for s in samples if s.meta.get("clipped_polygons")]
    if clipped:
        total = sum(s.meta["clipped_polygons"] for s in clipped)
        print(f"{directory}: {total} polygon(s) in {len(clipped)} of {len(samples)} records "
              f"reach outside their image and were clipped to it (first: {clipped[0].source})",
              file=sys.stderr)
    return samples


def iter_expanded_texts(samples: Iterable[Sample]) -> Iterator[Sample]:
    """One sample per referring text of each ReasonSeg sample (LISA draws one at random each
    time; for training, every phrasing of the same target is more data), one at a time; other
    samples pass as they are. An explanatory sample keeps its mode's question form (meta
    "explanatory_prompt"). The masks are shared, not copied."""
    for sample in samples:
        texts = sample.meta.get("texts", []) if sample.meta.get("task") == "reason_seg" else []
        if len(texts) < 2:
            yield sample
            continue
        prompt = sample.meta.get("explanatory_prompt") or (
            REASONSEG_SENTENCE_PROMPT if sample.meta["is_sentence"] else REASONSEG_PHRASE_PROMPT)
        for text in texts:
            turns = [{"role": "user", "content": prompt.format(text=text)}] + sample.turns[1:]
            yield Sample(images=sample.images, turns=turns, masks=sample.masks,
                         source=sample.source, meta=sample.meta)


def expand_referring_texts(samples: list[Sample]) -> list[Sample]:
    """iter_expanded_texts as a list."""
    return list(iter_expanded_texts(samples))
