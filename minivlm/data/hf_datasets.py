"""Hugging Face datasets as Samples: a save_to_disk folder, parquet file(s), or a hub name.

The layout is told from the column names (after `columns` has renamed them):
  cauldron   images: [image], texts: [{"user", "assistant", "source"}]  (HuggingFaceM4/the_cauldron)
  llava      conversations: [{"from", "value"}], image: image | None or images: [image]
             (lmms-lab/LLaVA-OneVision-Data; shapes/export.py writes LLaVA JSON this way)
  messages   messages: [{"role", "content"}], images: [image]
  vqa        question, answer, image or images      one user turn, one assistant turn
  caption    caption, image or images               a pretrain prompt, then the caption
`columns` maps our names to a dataset's own, as a dict or "image=img,conversations=conv".

An image cell is what datasets' Image feature stores, {"bytes", "path"}. The bytes are kept as they
are (decoded later by the data loader, as a file would be, images.load_image); a cell with a path
only names a file, absolute or beside the dataset. The other columns ride along in meta, as the
JSON readers' extra keys do; a null cell is an absent key (a column that only some rows fill).
The rest follows readers.py: placeholders added when the text has none, locations
"file.parquet:17" (row 17, 0-based, of that file), errors raised or collected as one line each.

Local files are read with pyarrow (which `datasets` installs), row group by row group, so a file
is never loaded whole and a stream can start at any row (shard_stream.py reads the same files).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from minivlm.data.record_rules import (PRETRAIN_PROMPTS, add_placeholders, llava_turns,
                                       resolve_image)
from minivlm.data.sample import Sample, check_sample, get_field, read_text
from minivlm.errors import one_line

LAYOUTS = {  # kind -> (fields it needs, fields it may have), in the order they are tried
    "cauldron": (("images", "texts"), ()),
    "llava": (("conversations",), ("image", "images")),
    "messages": (("messages",), ("images",)),
    "vqa": (("question", "answer"), ("image", "images")),
    "caption": (("caption",), ("image", "images")),
}
FIELDS = tuple(dict.fromkeys(f for need, may in LAYOUTS.values() for f in need + may))
TASKS = {"vqa": "vqa", "caption": "caption"}  # meta["task"] by layout; the others are "chat"
ROWS_PER_BATCH = 64  # rows decoded from Arrow at a time: 64 rows of images stay well under 1 GB


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    kind: str  # a key of LAYOUTS
    fields: dict  # our field name -> the dataset's column


def parse_columns(columns: str | dict | None) -> dict:
    """"image=img,conversations=conv" (or the dict) as {our field: the dataset's column}."""
    if isinstance(columns, str):
        pairs = [part.split("=", 1) for part in columns.split(",") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"columns='{columns}': expected field=column pairs, comma separated")
        columns = {ours.strip(): theirs.strip() for ours, theirs in pairs}
    unknown = sorted(set(columns or {}) - set(FIELDS))
    if unknown:
        raise ValueError(f"columns: unknown field(s) {unknown}; the fields are {list(FIELDS)}")
    return dict(columns or {})


def detect_layout(names: list[str], columns: str | dict | None, where: str) -> Layout:
    """The layout of a table with these column names; `columns` renames before detection."""
    renames = parse_columns(columns)
    for ours, theirs in renames.items():
        if theirs not in names:
            raise ValueError(f"{where}: no column '{theirs}' (named for '{ours}' in columns); "
                             f"the columns are {names}")
    renamed = set(renames.values())
    fields = {**{n: n for n in names if n in FIELDS and n not in renamed}, **renames}
    for kind, (need, may) in LAYOUTS.items():
        if all(f in fields for f in need):
            return Layout(kind, {f: fields[f] for f in need + may if f in fields})
    raise ValueError(f"{where}: cannot tell the layout from the columns {names}; expected "
                     "images + texts (the Cauldron), conversations (LLaVA), messages, "
                     "question + answer, or caption, or name them with columns='image=...,...'")


# ---------------------------------------------------------------------------- rows to samples
def caption_turns(caption: str, num_images: int) -> list[dict]:
    """Caption pretraining: a pretrain prompt (picked by the caption's CRC, so every reader and
    every epoch picks the same one), answered with the caption."""
    prompt = PRETRAIN_PROMPTS[zlib.crc32(caption.encode("utf-8")) % len(PRETRAIN_PROMPTS)]
    return [{"role": "user", "content": "<image>\n" * num_images + prompt},
            {"role": "assistant", "content": caption}]


def image_entries(cell: object, where: str, base_dir: Path | None) -> list[Path | bytes]:
    """An image cell (or a list of them) as Sample.images entries: encoded bytes, or a path."""
    if cell is None:  # LLaVA-OneVision's text-only rows
        return []
    cells = cell if isinstance(cell, list) else [cell]
    entries = []
    for i, item in enumerate(cells):
        if isinstance(item, dict) and item.get("bytes") is not None:
            item = item["bytes"]
        elif isinstance(item, dict) and item.get("path"):
            item = item["path"]
        if isinstance(item, (bytes, bytearray)):
            entries.append(bytes(item))
        elif isinstance(item, str) and item:
            entries.append(resolve_image(item, base_dir or Path("."), where))
        else:
            raise ValueError(f"{where}: image {i}: expected image bytes or a path, "
                             f"found {type(item).__name__}")
    return entries


def row_sample(row: dict, layout: Layout, where: str, base_dir: Path | None) -> Sample:
    column = layout.fields
    images = (image_entries(row.get(column["image"]), where, base_dir) if "image" in column
              else image_entries(row.get(column.get("images")), where, base_dir))
    meta = {"task": TASKS.get(layout.kind, "chat")}
    if layout.kind == "cauldron":
        texts = row[column["texts"]] or []
        turns = []
        for i, text in enumerate(texts):
            at = f"{where}: texts[{i}]"
            turns += [{"role": "user", "content": get_field(text, "user", str, at)},
                      {"role": "assistant", "content": get_field(text, "assistant", str, at)}]
        if texts and isinstance(texts[0].get("source"), str):
            meta["data_source"] = texts[0]["source"]
    elif layout.kind == "llava":
        turns = llava_turns(row[column["conversations"]], where)
    elif layout.kind == "messages":
        turns = [{"role": get_field(m, "role", str, f"{where}: messages[{i}]"),
                  "content": get_field(m, "content", str, f"{where}: messages[{i}]")}
                 for i, m in enumerate(row[column["messages"]] or [])]
    elif layout.kind == "vqa":
        turns = [{"role": "user", "content": get_field(row, column["question"], str, where)},
                 {"role": "assistant", "content": get_field(row, column["answer"], str, where)}]
    else:
        turns = caption_turns(get_field(row, column["caption"], str, where), len(images))
    used = set(column.values())
    meta.update({k: v for k, v in row.items() if k not in used and v is not None})
    return Sample(images=images, turns=add_placeholders(turns, len(images), where),
                  source=where, meta=meta)


# ---------------------------------------------------------------------------- files
def hf_files(path: Path, split: str | None = None) -> list[Path]:
    """The data files of a parquet or .arrow file, a folder of parquet files (a hub snapshot), or
    a save_to_disk folder (Dataset: state.json lists them; DatasetDict: one folder per split)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path}: file not found")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads(read_text(path / "dataset_dict.json"))["splits"]
        split = split or (splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise ValueError(f"{path}: a DatasetDict with splits {splits}; choose one (split=, "
                             "or its folder)")
        path = path / split
    if (path / "state.json").is_file():
        state = json.loads(read_text(path / "state.json"))
        return [path / data_file["filename"] for data_file in state["_data_files"]]
    files = sorted(path.rglob("*.parquet"))
    if split:  # the hub's names: data/train-00000-of-00002.parquet, or a folder per split
        files = [f for f in files if f.name.startswith(f"{split}-") or f.parent.name == split]
    if not files:
        raise ValueError(f"{path}: no parquet files{f' of split {split}' if split else ''}, and "
                         "no state.json or dataset_dict.json (datasets' save_to_disk)")
    return files


def file_samples(path: Path, columns: str | dict | None = None,
                 start: int = 0) -> Iterator[tuple[int, Sample | ValueError]]:
    """(row index, Sample) for each row of one parquet or .arrow file from row `start` on; a bad
    row comes as its ValueError, so the caller can skip it. A file that cannot be read, or whose
    columns fit no layout, raises."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = "arrow" if path.suffix == ".arrow" else "parquet"
    try:
        if kind == "arrow":  # save_to_disk writes Arrow IPC streams
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
            names, batches = reader.schema.names, iter(reader)
        else:
            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
            first_group, skipped = 0, 0  # skip whole row groups before `start` unread
            while (first_group < parquet.num_row_groups and skipped
                   + parquet.metadata.row_group(first_group).num_rows <= start):
                skipped += parquet.metadata.row_group(first_group).num_rows
                first_group += 1
            batches = parquet.iter_batches(ROWS_PER_BATCH, range(first_group,
                                                                 parquet.num_row_groups))
        layout = detect_layout(names, columns, str(path))
        first = 0 if kind == "arrow" else skipped  # the row index of the batch's first row
        for batch in batches:
            offset = max(start - first, 0)
            if offset < batch.num_rows:
                for index, row in enumerate(batch.slice(offset).to_pylist(), first + offset):
                    yield index, _checked(row, layout, f"{path}:{index}", path.parent)
            first += batch.num_rows
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"{path}: cannot read the {kind} file ({one_line(error)})") from None


def read_hf_dataset(path: str | Path, columns: str | dict | None = None,
                    errors: list[str] | None = None, split: str | None = None,
                    subset: str | None = None) -> list[Sample]:
    """Every row as a Sample (a bad row raises, or is appended to `errors` and left out).

    `path`: a parquet/.arrow file, a folder (save_to_disk, or parquet files), or a hub name such
    as "HuggingFaceM4/the_cauldron" with `subset="ai2d"` (datasets.load_dataset; needs a
    network). At real size, stream the files instead (shard_stream.ShardStream).
    """
    local = Path(path)
    if local.exists() or str(path).count("/") != 1 or local.suffix in (".parquet", ".arrow"):
        rows = (item for file in hf_files(local, split) for _, item in file_samples(file, columns))
    else:
        rows = _hub_samples(str(path), subset, split or "train", columns)
    samples = []
    for item in rows:
        if isinstance(item, ValueError):
            if errors is None:
                raise item
            errors.append(str(item))
        else:
            samples.append(item)
    return samples


def _hub_samples(name: str, subset: str | None, split: str,
                 columns: str | dict | None) -> Iterator[Sample | ValueError]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except (OSError, ValueError) as error:  # not found, no network, no such subset or split
        raise ValueError(f"{name}: not a local path, and datasets.load_dataset failed "
                         f"({one_line(error)})") from None
    layout = detect_layout(dataset.column_names, columns, name)
    index = 0
    for batch in dataset.with_format("arrow").iter(ROWS_PER_BATCH):  # image cells undecoded
        for row in batch.to_pylist():
            yield _checked(row, layout, f"{name}:{split}:{index}", None)
            index += 1


def _checked(row: dict, layout: Layout, where: str, base_dir: Path | None) -> Sample | ValueError:
    try:
        sample = row_sample(row, layout, where, base_dir)
        check_sample(sample)
    except ValueError as error:
        return error
    return sample
