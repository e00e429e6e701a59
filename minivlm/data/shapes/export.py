"""The shapes world's splits in the formats real data comes in: WebDataset shards, a Hugging Face
save_to_disk folder, or parquet files.

    python -m minivlm.data.shapes.export --data data/shapes/pretrain.json --to webdataset \\
        --out data/shapes/pretrain-wds --shard-size 1000
    python -m minivlm.data.shapes.export --data data/shapes/sft.json --to hf --out DIR
    python -m minivlm.data.shapes.export --data data/shapes/sft.json --to parquet --out DIR

The files are written by webdataset's ShardWriter and by datasets' own writers (save_to_disk,
to_parquet), so they are genuinely in those formats; shard_stream.ShardStream and
hf_datasets.read_hf_dataset read them back into the Samples the JSON reader gives.
  webdataset  DIR/shard-000000.tar, ...: per sample KEY.png (KEY.0.png, KEY.1.png for two
              images), KEY.json (the record: "conversations" and the extra keys), and KEY.txt
              (the caption) when the record is a caption
  hf          DIR/ from Dataset.save_to_disk: data-00000-of-0000N.arrow, state.json, ...
  parquet     DIR/train-00000-of-0000N.parquet, the hub's names
Columns (hf, parquet): "image" (datasets.Image; "images", a list, when a record has two),
"conversations" (LLaVA's from/value) and one per extra key, which a record without it leaves null.
Any file read_dataset reads can be exported, except ReasonSeg folders (masks are not exported).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from minivlm.cli import add_config_args, config_from_args
from minivlm.data.readers import read_dataset
from minivlm.data.sample import Sample
from minivlm.errors import one_line, run_cli
from minivlm.ranges import at_least, check_ranges, one_of

LLAVA_SPEAKERS = {"user": "human", "assistant": "gpt", "system": "system"}


@dataclass
class ExportConfig:
    data: str = "data/shapes/pretrain.json"  # any file read_dataset reads
    to: str = field(default="webdataset", metadata=one_of("webdataset", "hf", "parquet"))
    out: str = ""  # a new or empty folder
    shard_size: int = field(default=1000, metadata=at_least(1))  # samples per shard / file

    def __post_init__(self):
        check_ranges(self)


def llava_record(sample: Sample) -> dict:
    """The sample as a LLaVA record without its image names: conversations, then meta."""
    return {"conversations": [{"from": LLAVA_SPEAKERS[t["role"]], "value": t["content"]}
                              for t in sample.turns], **sample.meta}


def write_webdataset(samples: list[Sample], out: Path, shard_size: int) -> list[Path]:
    import webdataset

    written = []
    # encoder=False: every member is given as bytes, so none is re-encoded; mtime=0: the same
    # data gives byte-identical shards
    with webdataset.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0,
                                encoder=False, mtime=0,
                                post=lambda name: written.append(Path(name))) as writer:
        for index, sample in enumerate(samples):
            record = llava_record(sample)
            members = {"__key__": f"{index:06d}",
                       "json": json.dumps(record, ensure_ascii=False).encode("utf-8")}
            for k, image in enumerate(sample.images):
                suffix = Path(image).suffix.lstrip(".").lower()
                members[suffix if len(sample.images) == 1 else f"{k}.{suffix}"] = \
                    Path(image).read_bytes()
            if sample.meta.get("task") == "caption":
                members["txt"] = sample.turns[-1]["content"].encode("utf-8")
            writer.write(members)
    return written


def hf_dataset(samples: list[Sample]):
    """A datasets.Dataset of the samples: image bytes in an Image column, the rest as columns."""
    import datasets

    several = any(len(s.images) > 1 for s in samples)
    records = []
    for sample in samples:
        cells = [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in sample.images]
        records.append({("images" if several else "image"): cells if several else
                        (cells[0] if cells else None), **llava_record(sample)})
    names = list(dict.fromkeys(k for record in records for k in record))
    columns = {name: [record.get(name) for record in records] for name in names}
    image_feature = [datasets.Image()] if several else datasets.Image()
    try:
        dataset = datasets.Dataset.from_dict(columns)
        return dataset.cast_column("images" if several else "image", image_feature)
    except (ValueError, TypeError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{samples[0].source}: cannot make one table of the records "
                         f"({one_line(error)})") from None


def export(config: ExportConfig) -> list[Path]:
    """Write config.data in config.to's format under config.out; returns the data files."""
    if not config.out:
        raise ValueError("--out is required: the folder to write")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; choose an empty or new folder")
    samples = read_dataset(config.data)
    if not samples:
        raise ValueError(f"{config.data}: no records to export")
    if with_masks := next((s for s in samples if s.masks), None):
        raise ValueError(f"{with_masks.source}: has masks, which are not exported "
                         "(ReasonSeg stays a folder)")
    out.mkdir(parents=True, exist_ok=True)
    if config.to == "webdataset":
        return write_webdataset(samples, out, config.shard_size)
    dataset = hf_dataset(samples)
    num_files = math.ceil(len(dataset) / config.shard_size)
    if config.to == "hf":
        dataset.save_to_disk(str(out), num_shards=num_files)
        return sorted(out.glob("*.arrow"))
    files = [out / f"train-{i:05d}-of-{num_files:05d}.parquet" for i in range(num_files)]
    for i, path in enumerate(files):
        dataset.shard(num_files, i, contiguous=True).to_parquet(str(path))
    return files


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, ExportConfig)
    config = config_from_args(parser.parse_args(argv), ExportConfig)
    files = export(config)
    print(f"{config.data}: {len(files)} {config.to} file(s) in {config.out}")
    return files


if __name__ == "__main__":
    run_cli(main)
