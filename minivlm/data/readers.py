"""Readers for the four on-disk formats. Each turns a file (or folder) into list[Sample].

  read_llava_json      [{"id", "image": str | [str], "conversations": [{"from", "value"}]}]
  read_messages_jsonl  one {"messages": [{"role", "content"}], "images": [...]} per line
  read_chiron_eval     [{"id", "img_name": str | [str], "question", "reasoning", "answer",
                         "answer_type"}]
  read_reasonseg_dir   LISA's ReasonSeg folder: NAME.jpg + labelme NAME.json (in reasonseg.py)
  read_sem_seg_dir, read_ade20k, read_cocostuff   class-index PNGs (in sem_seg.py)
  read_refer_dir       refcoco & co.: refs(unc).p + instances.json (in refer_seg.py)
  read_hf_dataset      a Hugging Face dataset: a save_to_disk folder or parquet file(s)
                       (in hf_datasets.py; "hf:PATH", or told from the files)
  read_dataset         picks one of the above from the path and the record keys, or from a
                       folder's contents, or from a prefix naming the kind ("ade20k:PATH");
                       iter_dataset yields the same samples one at a time (a JSON file is never
                       held whole: sample.iter_records)

Rules shared by every reader (the code: record_rules.py):
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

import itertools
from pathlib import Path
from typing import Iterator

from minivlm.constants import FINAL_ANSWER_PREFIX
from minivlm.data.hf_datasets import read_hf_dataset
from minivlm.data.reasonseg import REASONSEG_IMAGE_SUFFIXES, read_reasonseg_dir
from minivlm.data.record_rules import add_placeholders, llava_turns, resolve_image
from minivlm.data.refer_seg import read_refer_dir, refs_files
from minivlm.data.sample import (Converter, Sample, convert_all, extra_fields, get_field,
                                 iter_converted, iter_records, read_records, string_list)
from minivlm.data.seg_data_config import SegDataConfig
from minivlm.data.sem_seg import (ADE20K_SPLITS, CLASS_FILES, ade20k_root, read_ade20k,
                                  read_cocostuff, read_sem_seg_dir)


def _image_dir(path: Path, image_dir: str | Path | None) -> Path:
    return Path(image_dir) if image_dir is not None else path.parent


# ---------------------------------------------------------------------------- record converters
def _llava_record(record: object, where: str, image_dir: Path) -> Sample:
    turns = llava_turns(get_field(record, "conversations", list, where), where)
    names = string_list(get_field(record, "image", (str, list), where, default=[]), "image",
                        where)
    turns = add_placeholders(turns, len(names), where)
    images = [resolve_image(name, image_dir, where) for name in names]
    meta = {"task": "chat", **extra_fields(record, ("image", "conversations"))}
    return Sample(images=images, turns=turns, source=where, meta=meta)


def _messages_record(record: object, where: str, image_dir: Path) -> Sample:
    messages = get_field(record, "messages", list, where)
    turns = []
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        turns.append({"role": get_field(message, "role", str, at),
                      "content": get_field(message, "content", str, at)})
    names = string_list(get_field(record, "images", (str, list), where, default=[]), "images",
                        where)
    turns = add_placeholders(turns, len(names), where)
    images = [resolve_image(name, image_dir, where) for name in names]
    meta = {"task": "chat", **extra_fields(record, ("messages", "images"))}
    return Sample(images=images, turns=turns, source=where, meta=meta)


def _chiron_record(record: object, where: str, image_dir: Path) -> Sample:
    record_id = get_field(record, "id", (int, str), where)
    names = string_list(get_field(record, "img_name", (str, list), where), "img_name", where)
    question = get_field(record, "question", str, where)
    answer = get_field(record, "answer", str, where)
    answer_type = get_field(record, "answer_type", str, where)
    reasoning = get_field(record, "reasoning", str, where, default="")
    # The reference response as Chiron-o1 is trained to write it: reasoning, then the marked answer.
    response = ((reasoning.rstrip() + "\n" if reasoning.strip() else "")
                + FINAL_ANSWER_PREFIX + answer)
    turns = add_placeholders([{"role": "user", "content": question},
                              {"role": "assistant", "content": response}], len(names), where)
    images = [resolve_image(name, image_dir, where) for name in names]
    meta = {"task": "vqa", **extra_fields(record, ("question",)), "id": record_id,
            "answer": answer, "answer_type": answer_type, "img_name": names,
            "reasoning": reasoning}
    return Sample(images=images, turns=turns, source=where, meta=meta)


# ---------------------------------------------------------------------------- public readers
def _read_file(path: str | Path, image_dir: str | Path | None, convert: Converter,
               errors: list[str] | None) -> list[Sample]:
    path = Path(path)
    return convert_all(read_records(path), convert, _image_dir(path, image_dir), errors)


def read_llava_json(path: str | Path, image_dir: str | Path | None = None,
                    errors: list[str] | None = None) -> list[Sample]:
    return _read_file(path, image_dir, _llava_record, errors)


def read_messages_jsonl(path: str | Path, image_dir: str | Path | None = None,
                        errors: list[str] | None = None) -> list[Sample]:
    return _read_file(path, image_dir, _messages_record, errors)


def read_chiron_eval(path: str | Path, image_dir: str | Path | None = None,
                     errors: list[str] | None = None) -> list[Sample]:
    return _read_file(path, image_dir, _chiron_record, errors)


# Each folder kind: how to recognise it (in this order) and what that looks for.
FOLDER_KINDS = {
    "refer_seg": "refs(*).p (+ instances.json)",
    "sem_seg": "annotations/ + classes.txt or classes.json",
    "ade20k": "annotations/training or annotations/validation, here or in ADEChallengeData2016/",
    "cocostuff": "stuffthingmaps_trainval2017/",
    "reasonseg": "NAME.json + NAME.jpg",
}


def folder_kind(path: Path) -> str:
    """Which FOLDER_KINDS entry a folder's contents match; a one-line error lists them all."""
    if refs_files(path):
        return "refer_seg"
    if (path / "annotations").is_dir() and any((path / n).is_file() for n in CLASS_FILES):
        return "sem_seg"
    if any((ade20k_root(path) / "annotations" / s).is_dir() for s in ADE20K_SPLITS.values()):
        return "ade20k"
    if (path / "stuffthingmaps_trainval2017").is_dir():
        return "cocostuff"
    if any(p.suffix in (".json",) + REASONSEG_IMAGE_SUFFIXES for p in path.iterdir()):
        return "reasonseg"
    raise ValueError(f"{path}: cannot tell the dataset kind from the folder; looked for "
                     + "; ".join(f"{v} ({k})" for k, v in FOLDER_KINDS.items())
                     + ". Or name it: KIND:PATH")


HF_KIND = "hf"  # the prefix of a Hugging Face dataset: "hf:PATH"


def split_kind(path: str | Path) -> tuple[str | None, Path]:
    """"ade20k:data/ADE" -> ("ade20k", Path("data/ADE")); a path with no known prefix -> (None,
    path)."""
    kind, sep, rest = str(path).partition(":")
    known = sep and (kind in FOLDER_KINDS or kind == HF_KIND)
    return (kind, Path(rest)) if known else (None, Path(path))


def is_hf_dataset(path: Path) -> bool:
    """A parquet/.arrow file, a save_to_disk folder (state.json, dataset_info.json or
    dataset_dict.json) or a folder of parquet files."""
    if path.is_file():
        return path.suffix in (".parquet", ".arrow")
    markers = ("state.json", "dataset_info.json", "dataset_dict.json")
    return path.is_dir() and (any((path / name).is_file() for name in markers)
                              or any(path.glob("*.parquet")))


def read_dataset(path: str | Path, image_dir: str | Path | None = None,
                 errors: list[str] | None = None,
                 seg_data: SegDataConfig | None = None,
                 columns: str | dict | None = None) -> list[Sample]:
    """Read any supported format (iter_dataset, as a list)."""
    return list(iter_dataset(path, image_dir, errors, seg_data, columns))


def iter_dataset(path: str | Path, image_dir: str | Path | None = None,
                 errors: list[str] | None = None,
                 seg_data: SegDataConfig | None = None,
                 columns: str | dict | None = None) -> Iterator[Sample]:
    """Every sample of any supported format, one at a time (a JSON file is parsed record by
    record). A folder's kind comes from a prefix ("sem_seg:", "ade20k:", "cocostuff:",
    "refer_seg:", "reasonseg:"), else from its contents (folder_kind); a file's from its first
    record's keys. `seg_data` holds the segmentation readers' options; `image_dir` is where
    refer_seg and cocostuff find their (COCO) images. A Hugging Face dataset ("hf:PATH", or
    is_hf_dataset) is read by read_hf_dataset with the column mapping `columns`."""
    kind, path = split_kind(path)
    if kind == HF_KIND or (kind is None and is_hf_dataset(path)):
        yield from read_hf_dataset(path, columns, errors)
        return
    if path.is_dir() or kind is not None:
        if not path.is_dir():
            raise ValueError(f"{path}: not a directory (expected a {kind} folder: "
                             f"{FOLDER_KINDS[kind]})")
        yield from _read_folder(kind or folder_kind(path), path, image_dir, errors, seg_data)
        return
    records = iter_records(path)
    head = []  # the records up to the first object, whose keys name the format
    for where, record in records:
        head.append((where, record))
        if isinstance(record, dict):
            break
    records = itertools.chain(head, records)
    if not head or not isinstance(head[-1][1], dict):  # empty, or only bad lines: each reports
        yield from iter_converted(records, _llava_record, path.parent, errors)
        return
    first = head[-1][1]
    if "conversations" in first:
        convert = _llava_record
    elif "messages" in first:
        convert = _messages_record
    elif "question" in first and "img_name" in first:
        convert = _chiron_record
    else:
        raise ValueError(f"{path}: cannot tell the format from the record keys {sorted(first)}; "
                         "expected 'conversations' (LLaVA), 'messages' (messages JSONL) or "
                         "'question' + 'img_name' (Chiron-o1)")
    yield from iter_converted(records, convert, _image_dir(path, image_dir), errors)


def _read_folder(kind: str, path: Path, image_dir: str | Path | None, errors: list[str] | None,
                 seg_data: SegDataConfig | None) -> list[Sample]:
    if kind == "refer_seg":
        return read_refer_dir(path, seg_data, errors, image_dir)
    if kind == "sem_seg":
        return read_sem_seg_dir(path, seg_data, errors)
    if kind == "ade20k":
        return read_ade20k(path, seg_data, errors)
    if kind == "cocostuff":
        return read_cocostuff(path, seg_data, errors, image_dir)
    return read_reasonseg_dir(path, errors, seg_data)
