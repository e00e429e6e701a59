"""Referring segmentation (refcoco, refcoco+, refcocog, refclef) as LISA reads it
(utils/refer_seg_dataset.py over utils/refer.py): the refs of one image are grouped, up to N of
their sentences drawn, each asked with a short question ("Can you segment the man on the left in
this image?") and answered with one [SEG], each [SEG] with its annotation's mask.

The layout (refer.py's), one folder per dataset:
  DIR/refs(unc).p      (refcocog: refs(umd).p) a pickle: a list of {"ref_id", "ann_id",
                       "image_id", "split", "sentences": [{"sent", "raw", "tokens", "sent_id"}],
                       "category_id", "file_name", ...}; read without loading any class
  DIR/instances.json   COCO: "images" [{"id", "file_name", "height", "width"}], "annotations"
                       [{"id", "image_id", "segmentation": polygons or RLE}], "categories"
  images               file_name under image_dir, else DIR/images/, DIR/, or LISA's
                       DIR/../images/mscoco/images/train2014/ (refclef: DIR/../images/saiapr_tc-12/)
"""

from __future__ import annotations

import json
from pathlib import Path

from minivlm.data.coco_masks import coco_mask
from minivlm.data.images import image_size
from minivlm.data.lisa_templates import (convert_image_records, record_rng, sample_indices,
                                         seg_answer, seg_samples, short_question)
from minivlm.data.safe_pickle import load_plain_pickle
from minivlm.data.sample import Sample, get_field, read_text
from minivlm.data.seg_data_config import SegDataConfig

PREFERRED_SPLIT_BY = ("unc", "umd")  # LISA: umd for refcocog, unc for refcoco, refcoco+, refclef


def refs_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("refs(*).p"))


def refs_file(directory: Path, split_by: str = "") -> Path:
    """DIR/refs(split_by).p; with no split_by, unc, then umd, then the only one there is."""
    found = refs_files(directory)
    if split_by:
        path = directory / f"refs({split_by}).p"
        if path.is_file():
            return path
        raise ValueError(f"{path}: file not found (found {[p.name for p in found] or 'none'})")
    for name in PREFERRED_SPLIT_BY:
        if (directory / f"refs({name}).p").is_file():
            return directory / f"refs({name}).p"
    if len(found) == 1:
        return found[0]
    raise ValueError(f"{directory}: " + (f"several refs files {[p.name for p in found]}; name one "
                                         "with refer_split_by" if found
                                         else "no refs(*).p file (refs(unc).p, refs(umd).p)"))


def split_matches(wanted: str, split: str) -> bool:
    """refer.py getRefIds: testA/B/C match any split containing that letter (testAB too), test
    matches every test split, the rest match exactly."""
    if wanted in ("testA", "testB", "testC"):
        return wanted[-1] in split
    if wanted == "test":
        return "test" in split
    return split == wanted


def _index(items: object, key: str, path: Path) -> dict:
    if not isinstance(items, list):
        raise ValueError(f"{path}: '{key}' should be a list, found {type(items).__name__}")
    index = {}
    for i, item in enumerate(items):
        index[get_field(item, "id", (int, str), f"{path}: {key}[{i}]")] = item
    return index


def read_instances(path: Path) -> tuple[dict, dict]:
    """(images by id, annotations by id) from a COCO instances.json."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error.msg} at line {error.lineno})") from None
    images = _index(get_field(data, "images", list, str(path)), "images", path)
    annotations = _index(get_field(data, "annotations", list, str(path)), "annotations", path)
    return images, annotations


def _group_by_image(refs: object, path: Path, split: str) -> list[tuple[str, object]]:
    """(location, (image_id, refs)) per image with a ref in `split`, in the file's order; a
    malformed ref becomes a ValueError record of its own."""
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    groups: dict[object, list[dict]] = {}
    bad, splits = [], set()
    for i, ref in enumerate(refs):
        at = f"{path}: refs[{i}]"
        try:
            ref_split = get_field(ref, "split", str, at)
            image_id = get_field(ref, "image_id", (int, str), at)
        except ValueError as error:
            bad.append((at, error))
            continue
        splits.add(ref_split)
        if split_matches(split, ref_split):
            groups.setdefault(image_id, []).append(ref)
    if not groups and not bad:
        raise ValueError(f"{path}: no ref in split '{split}' (splits there: {sorted(splits)})")
    # bad refs last, so that they shift no image's record index (its random stream)
    return [(f"{path}: image {image_id}", (image_id, group))
            for image_id, group in groups.items()] + bad


def _find_image(file_name: str, directory: Path, image_dir: Path | None, where: str) -> Path:
    roots = ([image_dir] if image_dir is not None else
             [directory / "images", directory,
              directory.parent / "images" / "mscoco" / "images" / "train2014",
              directory.parent / "images" / "saiapr_tc-12"])
    for root in roots:
        if (root / file_name).is_file():
            return root / file_name
    raise ValueError(f"{where}: image '{file_name}' not found (looked in "
                     f"{', '.join(str(r) for r in roots)})")


def _record_samples(record: tuple, where: str, index: int, images: dict, annotations: dict,
                    paths: tuple[Path, Path, Path | None], c: SegDataConfig) -> list[Sample]:
    image_id, refs = record
    refs_path, instances_path, image_dir = paths
    info = images.get(image_id)
    if info is None:
        raise ValueError(f"{where}: image_id {image_id!r} is not in {instances_path}")
    at = f"{instances_path}: image {image_id}"
    height, width = get_field(info, "height", int, at), get_field(info, "width", int, at)
    image = _find_image(get_field(info, "file_name", str, at), refs_path.parent, image_dir,
                        where)
    actual = image_size(image)
    if actual != (width, height):
        raise ValueError(f"{where}: {image} is {actual[0]}x{actual[1]} but "
                         f"{instances_path.name} says {width}x{height}")

    # LISA: every sentence of every ref of the image, each with its ref's annotation.
    sentences, ann_ids = [], []
    for ref in refs:
        ref_at = f"{refs_path}: ref {ref.get('ref_id', '?')} (image {image_id})"
        ann_id = get_field(ref, "ann_id", (int, str), ref_at)
        if ann_id not in annotations:  # refer.py indexes every ref's annotation on loading
            raise ValueError(f"{ref_at}: ann_id {ann_id!r} is not in {instances_path}")
        for k, sentence in enumerate(get_field(ref, "sentences", list, ref_at)):
            text = get_field(sentence, "sent", str, f"{ref_at}: sentences[{k}]").strip()
            if not text:
                raise ValueError(f"{ref_at}: sentences[{k}] is empty")
            sentences.append(text)
            ann_ids.append(ann_id)
    if not sentences:
        raise ValueError(f"{where}: its refs have no sentences")

    rng = record_rng(c.seed, index)
    chosen = sample_indices(rng, len(sentences), c.num_classes_per_sample)
    questions, answers = [], []
    for k in chosen:  # LISA's order of draws: a question, then its answer
        questions.append(short_question(rng, sentences[k]))
        answers.append(seg_answer(rng))
    masks = [coco_mask(get_field(annotations[ann_ids[k]], "segmentation", (list, dict),
                                 f"{instances_path}: annotation {ann_ids[k]}"),
                       height, width, f"{instances_path}: annotation {ann_ids[k]}")
             for k in chosen]  # checked here, decoded per item (CocoMask)
    meta = {"task": "refer_seg", "dataset": refs_path.parent.name, "id": image_id,
            "sentences": [sentences[k] for k in chosen], "ann_ids": [ann_ids[k] for k in chosen]}
    return seg_samples(image, questions, answers, masks, where, meta, c.multi_turn)


def read_refer_dir(directory: str | Path, seg_data: SegDataConfig | None = None,
                   errors: list[str] | None = None,
                   image_dir: str | Path | None = None) -> list[Sample]:
    """The refs of `seg_data.split` in DIR/refs(...).p with DIR/instances.json, one record per
    image (in the order the refs file first names them)."""
    directory = Path(directory)
    c = seg_data or SegDataConfig()
    refs_path = refs_file(directory, c.refer_split_by)
    instances_path = directory / "instances.json"
    if not instances_path.is_file():
        raise ValueError(f"{instances_path}: file not found (the refer layout keeps it next to "
                         f"{refs_path.name})")
    images, annotations = read_instances(instances_path)
    records = _group_by_image(load_plain_pickle(refs_path), refs_path, c.split)
    paths = (refs_path, instances_path, Path(image_dir) if image_dir is not None else None)
    return convert_image_records(
        records, lambda r, w, i: _record_samples(r, w, i, images, annotations, paths, c), errors)
