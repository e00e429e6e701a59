"""WebDataset tar shards as Samples, read with Python's tarfile.

A shard is a plain (uncompressed) tar whose members are grouped into samples by key, as
webdataset, img2dataset and open_clip write them: the key is the member's name up to the first
dot of its file name, the rest is the suffix, and a sample's members sit next to each other.

    000017.png  000017.txt  000017.json        one image, a caption, metadata (img2dataset)
    000018.0.png  000018.1.png  000018.json    two images, in the order of their numbers

Turns come from the .json's "conversations" (LLaVA's [{"from", "value"}], which is what
shapes/export.py writes) if it has them, else from the caption (the .txt, or the .json's
"caption") after a pretrain prompt (hf_datasets.caption_turns). The image members' bytes are the
Sample's images (decoded later by the data loader); the .json's other keys ride along in meta.
A sample is named "shard.tar:KEY" in every message.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

from minivlm.data.hf_datasets import caption_turns, llava_turns
from minivlm.data.readers import add_placeholders
from minivlm.data.sample import Sample, check_sample
from minivlm.errors import one_line

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # two zero blocks close every complete tar (POSIX)
KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def tar_samples(path: Path, start: int = 0) -> Iterator[tuple[int, Sample | ValueError]]:
    """(sample index, Sample) for each sample of one shard from index `start` on; the samples
    before it are passed over from their headers, unread. A bad sample comes as its ValueError,
    so the caller can skip it; a shard that cannot be read raises."""
    for index, key, files in _grouped_members(path, start):
        where = f"{path}:{key}"
        try:
            sample = tar_record_sample(files, where)
            check_sample(sample)
        except ValueError as error:
            sample = error
        yield index, sample


def _grouped_members(path: Path, start: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index, key, {suffix: bytes}) per sample, from the members in archive order."""
    try:
        archive = tarfile.open(path, "r:")  # random access: unread members are seeked past
    except FileNotFoundError:
        raise ValueError(f"{path}: shard not found") from None
    except (tarfile.TarError, OSError) as error:
        raise ValueError(f"{path}: not a readable tar file ({one_line(error)})") from None
    index, key, files, name = -1, None, {}, ""
    with archive:
        try:
            for member in archive:
                name = member.name
                match = KEY_AND_SUFFIX.match(name)
                if not member.isfile() or not match or Path(name).name.startswith("__"):
                    continue  # folders, names without a suffix, webdataset's __meta__ files
                member_key, suffix = match.group(1), match.group(2).lower()
                if member_key != key:
                    if files:
                        yield index, key, files
                    index, key, files = index + 1, member_key, {}
                if index < start:
                    continue
                if suffix in files:
                    raise ValueError(f"{path}: member {name} repeats the .{suffix} of sample "
                                     f"{key}")
                files[suffix] = archive.extractfile(member).read()
            # tarfile ends quietly where a header is missing or cut short; a shard cut at a
            # member's edge would lose its tail without a word, so the closing blocks must be there.
            if os.path.getsize(path) < archive.offset + END_OF_ARCHIVE:
                raise ValueError(f"{path}: truncated tar (ends after member {name} without the "
                                 "end-of-archive blocks)")
        except (tarfile.TarError, OSError) as error:
            raise ValueError(f"{path}: truncated or corrupt tar at member {name} "
                             f"({one_line(error)})") from None
    if files:
        yield index, key, files


def tar_record_sample(files: dict[str, bytes], where: str) -> Sample:
    """One sample's members ({suffix: bytes}) as a Sample."""
    image_suffixes = sorted((s for s in files if s.rsplit(".", 1)[-1] in IMAGE_SUFFIXES),
                            key=_image_order)
    images = [files[s] for s in image_suffixes]
    record = {}
    if "json" in files:
        try:
            record = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{where}: .json is not valid JSON ({one_line(error)})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: .json should hold an object, "
                             f"found {type(record).__name__}")
    if "conversations" in record:
        task, turns = "chat", llava_turns(record["conversations"], where)
    elif "txt" in files or isinstance(record.get("caption"), str):
        caption = (files["txt"].decode("utf-8", errors="replace") if "txt" in files
                   else record["caption"]).strip()
        task, turns = "caption", caption_turns(caption, len(images))
    else:
        raise ValueError(f"{where}: no .txt caption and no .json with 'conversations' or "
                         f"'caption' (members: {', '.join(sorted(files))})")
    meta = {"task": task, **{k: v for k, v in record.items()
                             if k not in ("conversations", "caption")}}
    return Sample(images=images, turns=add_placeholders(turns, len(images), where),
                  source=where, meta=meta)


def _image_order(suffix: str) -> tuple[int, str]:
    """"png" first (the only image), then "0.png", "1.png", ... by number."""
    number = suffix.split(".", 1)[0]
    return (int(number) if number.isdigit() and "." in suffix else -1, suffix)
