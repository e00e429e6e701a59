"""Semantic-segmentation datasets as LISA reads them (utils/sem_seg_dataset.py): an image and its
per-pixel class-index PNG become questions about up to N classes present ("Can you segment the
wall in this image?"), each answered with one [SEG], each [SEG] with the mask label == class.

Layouts (each one the folder a --data entry names; see readers.read_dataset):
  sem_seg    DIR/images/NAME.{jpg,jpeg,png}, DIR/annotations/NAME.png (class index per pixel,
             255 = ignore), DIR/classes.txt (line k names class k) or DIR/classes.json (a list)
  ade20k     DIR = ADEChallengeData2016 (or the folder holding it): images/{training,validation}/
             NAME.jpg, annotations/{training,validation}/NAME.png. Value 0 ("other") is ignore and
             k is ADE20K_CLASSES[k - 1] (LISA: label[label == 0] = 255; label -= 1).
  cocostuff  labels DIR/stuffthingmaps_trainval2017/{train,val}2017/NAME.png (or DIR/train2017/,
             LISA's cocostuff/ folder); images in image_dir, else DIR/images/train2017/ or LISA's
             DIR/../coco/train2017/, as NAME.jpg. Classes with "-" in their name (wall-other,
             floor-wood, ...) are ignore, as in LISA.
A mask is 1 where the label is the class, 255 where the label is ignore, 0 elsewhere: a ClassMask
(the label PNG and the class), read again from the PNG per item.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from minivlm.constants import MASK_IGNORE
from minivlm.data.images import image_size
from minivlm.data.lisa_templates import (convert_image_records, record_rng, sample_indices,
                                         seg_answer, seg_samples, short_question)
from minivlm.data.masks import MaskSource
from minivlm.data.sample import Sample, read_text
from minivlm.data.seg_data_config import SegDataConfig
from minivlm.data.sem_seg_classes import ADE20K_CLASSES, COCOSTUFF_CLASSES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CLASS_FILES = ("classes.txt", "classes.json")
ADE20K_SPLITS = {"train": "training", "val": "validation"}
COCOSTUFF_SPLITS = {"train": "train2017", "val": "val2017"}
INVALID = -1  # a label value the layout does not define


# ---------------------------------------------------------------------------- classes and labels
def read_class_names(directory: Path) -> tuple[str, ...]:
    """DIR/classes.txt (one name per line) or DIR/classes.json (a JSON list of names)."""
    for name in CLASS_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if path.suffix == ".json":
            try:
                names = json.loads(read_text(path))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: invalid JSON ({error.msg} at line {error.lineno})"
                                 ) from None
        else:
            names = read_text(path).rstrip("\n").split("\n")
        if not (isinstance(names, list) and names
                and all(isinstance(n, str) and n.strip() for n in names)):
            raise ValueError(f"{path}: expected a non-empty list of class names, one per "
                             "line (.txt) or a JSON list of strings (.json)")
        if len(names) > MASK_IGNORE:
            raise ValueError(f"{path}: {len(names)} classes; uint8 labels hold at most "
                             f"{MASK_IGNORE} (255 is ignore)")
        return tuple(n.strip() for n in names)
    raise ValueError(f"{directory}: no class names file (looked for "
                     f"{' and '.join(str(directory / n) for n in CLASS_FILES)})")


def label_table(num_classes: int, ignored: tuple[int, ...] = (), shift: int = 0) -> np.ndarray:
    """Raw label value -> class index (or 255 ignore, or INVALID), as a 256-entry lookup table.
    `shift` 1 is ADE20K's: raw 0 is ignore and raw k is class k - 1."""
    table = np.full(256, INVALID, dtype=np.int16)
    table[shift:shift + num_classes] = np.arange(num_classes)
    table[:shift] = MASK_IGNORE
    table[list(ignored)] = MASK_IGNORE
    table[MASK_IGNORE] = MASK_IGNORE
    return table


def _read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as label:
            if label.mode not in ("L", "P"):  # P: the palette index is the class, as np.array
                raise ValueError(f"{path}: expected a single-channel 8-bit class-index PNG, "
                                 f"found mode {label.mode}")
            return np.array(label)  # (H, W) uint8
    except OSError as error:  # missing, or truncated: one line naming the file
        raise ValueError(f"{path}: cannot read the label PNG ({error})") from None


def class_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """1 where the label is the class, 255 where it is ignore, 0 elsewhere."""
    return np.where(label == MASK_IGNORE, MASK_IGNORE, label == class_id).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class ClassMask(MaskSource):
    """One class of a label PNG: the file, its raw value -> class table, and the class."""

    shape: tuple[int, int]  # (H, W)
    label_path: Path
    table: np.ndarray  # label_table(...), shared by every mask of the dataset
    class_id: int

    def decode(self) -> np.ndarray:
        return class_mask(self.table[_read_label(self.label_path)], self.class_id)


# ---------------------------------------------------------------------------- records
def _pairs(image_dir: Path, label_dir: Path, labels_only: bool) -> list[tuple[str, tuple]]:
    """(location, (image or None, label or None)) by NAME, sorted; the location is the label's
    path (or the image's, when it has no label)."""
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder}: folder not found")
    found = [p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    images: dict[str, Path] = {}
    # NAME.jpg before NAME.jpeg before NAME.png, whatever order the folder lists them in
    for path in sorted(found, key=lambda p: IMAGE_SUFFIXES.index(p.suffix.lower())):
        images.setdefault(path.stem, path)
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == ".png"}
    names = sorted(labels) if labels_only else sorted(set(images) | set(labels))
    return [(str(labels.get(name) or images[name]), (images.get(name), labels.get(name)))
            for name in names]


def _record_samples(record: tuple, where: str, index: int, names: tuple[str, ...],
                    table: np.ndarray, dataset: str, c: SegDataConfig,
                    empty: list[str]) -> list[Sample]:
    image, label_path = record
    if label_path is None:
        raise ValueError(f"{where}: image has no label PNG {image.stem}.png")
    if image is None:
        raise ValueError(f"{where}: label has no image (looked for {label_path.stem} with "
                         f"suffix {' or '.join(IMAGE_SUFFIXES)})")
    raw = _read_label(label_path)
    width, height = image_size(image)
    if raw.shape != (height, width):
        raise ValueError(f"{where}: label is {raw.shape[1]}x{raw.shape[0]} but its image "
                         f"{image.name} is {width}x{height}")
    label = table[raw]  # (H, W) class index or 255
    if (label == INVALID).any():
        unknown = np.unique(raw[label == INVALID])[:5].tolist()
        raise ValueError(f"{where}: label values {unknown} name no class ({len(names)} classes, "
                         f"{MASK_IGNORE} = ignore)")
    present = [int(k) for k in np.unique(label) if k != MASK_IGNORE]
    if not present:  # LISA draws another image instead
        empty.append(where)
        return []
    rng = record_rng(c.seed, index)
    chosen = [present[i] for i in sample_indices(rng, len(present), c.num_classes_per_sample)]
    questions, answers = [], []
    for class_id in chosen:  # LISA's order of draws: a question, then its answer
        questions.append(short_question(rng, names[class_id]))
        answers.append(seg_answer(rng))
    masks = [ClassMask((height, width), label_path, table, class_id) for class_id in chosen]
    meta = {"task": "sem_seg", "dataset": dataset, "id": label_path.stem,
            "classes": [names[k] for k in chosen], "class_ids": chosen}
    return seg_samples(image, questions, answers, masks, where, meta, c.multi_turn)


def _read(records: list, names: tuple[str, ...], table: np.ndarray, dataset: str,
          seg_data: SegDataConfig | None, errors: list[str] | None, folder: Path) -> list[Sample]:
    c = seg_data or SegDataConfig()
    empty: list[str] = []
    samples = convert_image_records(
        records, lambda r, w, i: _record_samples(r, w, i, names, table, dataset, c, empty),
        errors)
    if empty:
        print(f"{folder}: {len(empty)} image(s) with no class but ignore were left out "
              f"(first: {empty[0]})", file=sys.stderr)
    return samples


# ---------------------------------------------------------------------------- public readers
def read_sem_seg_dir(directory: str | Path, seg_data: SegDataConfig | None = None,
                     errors: list[str] | None = None) -> list[Sample]:
    """The generic layout: images/, annotations/ and classes.txt or classes.json."""
    directory = Path(directory)
    names = read_class_names(directory)
    records = _pairs(directory / "images", directory / "annotations", labels_only=False)
    return _read(records, names, label_table(len(names)), "sem_seg", seg_data, errors, directory)


def ade20k_root(directory: Path) -> Path:
    nested = directory / "ADEChallengeData2016"
    return nested if nested.is_dir() else directory


def read_ade20k(directory: str | Path, seg_data: SegDataConfig | None = None,
                errors: list[str] | None = None) -> list[Sample]:
    root = ade20k_root(Path(directory))
    split = (seg_data or SegDataConfig()).split
    if split not in ADE20K_SPLITS:
        raise ValueError(f"{root}: ADE20K has splits {sorted(ADE20K_SPLITS)}, not '{split}'")
    records = _pairs(root / "images" / ADE20K_SPLITS[split],
                     root / "annotations" / ADE20K_SPLITS[split], labels_only=False)
    return _read(records, ADE20K_CLASSES, label_table(len(ADE20K_CLASSES), shift=1), "ade20k",
                 seg_data, errors, root)


def cocostuff_label_dir(directory: Path, split: str) -> Path:
    nested = directory / "stuffthingmaps_trainval2017" / COCOSTUFF_SPLITS[split]
    return nested if nested.is_dir() else directory / COCOSTUFF_SPLITS[split]


def read_cocostuff(directory: str | Path, seg_data: SegDataConfig | None = None,
                   errors: list[str] | None = None,
                   image_dir: str | Path | None = None) -> list[Sample]:
    directory = Path(directory)
    split = (seg_data or SegDataConfig()).split
    if split not in COCOSTUFF_SPLITS:
        raise ValueError(f"{directory}: COCO-Stuff has splits {sorted(COCOSTUFF_SPLITS)}, "
                         f"not '{split}'")
    folder = COCOSTUFF_SPLITS[split]
    candidates = ([Path(image_dir)] if image_dir is not None else
                  [directory / "images" / folder, directory.parent / "coco" / folder])
    images = next((p for p in candidates if p.is_dir()), candidates[0])
    records = _pairs(images, cocostuff_label_dir(directory, split), labels_only=True)
    # LISA: for c, i in class2index.items(): if "-" in c: label[label == i] = 255
    ignored = tuple(k for k, name in enumerate(COCOSTUFF_CLASSES) if "-" in name)
    return _read(records, COCOSTUFF_CLASSES, label_table(len(COCOSTUFF_CLASSES), ignored),
                 "cocostuff", seg_data, errors, directory)
