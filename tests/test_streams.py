"""Streams of real formats: WebDataset tars and Hugging Face datasets (save_to_disk, parquet).

Every file here is written by webdataset or datasets themselves (shapes/export.py, or the tests),
then read by our readers: the same Samples as the JSON reader (decoded pixels compared), every
sample once per epoch over 2 ranks x 2 DataLoader workers, an exact resume mid-shard, and one-line
errors that name the file.
"""

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import datasets  # the [data] extra (requirements-dev.txt installs it): writes the HF files
import numpy as np
import pytest
import webdataset  # writes the tar shards
from PIL import Image
from torch.utils.data import DataLoader

from minivlm.constants import IMAGE_TOKEN
from minivlm.data.batch import ChatDataset
from minivlm.data.hf_datasets import file_samples, read_hf_dataset
from minivlm.data.images import ImageError, ImageProcessor, image_size, load_image
from minivlm.data.readers import read_dataset
from minivlm.data.shapes.config import ShapesConfig
from minivlm.data.shapes.export import ExportConfig, export
from minivlm.data.shapes.generate import generate
from minivlm.data.record_rules import PRETRAIN_PROMPTS
from minivlm.data.shard_stream import (POSITION_KEY, ShardStream, expand_braces, merge_states,
                                       stream_positions)
from minivlm.data.load_tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The quick synthetic world with the counts these tests rely on: 16 pretrain captions and
    20 SFT records (4 of them with two images)."""
    out = tmp_path_factory.mktemp("world")
    generate(out, seed=0, config=replace(ShapesConfig.quick(), num_train_images=16,
                                         num_train_pairs=4))
    return out


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory) -> dict:
    """{(split, format): the files export wrote}, 3 samples a file: pretrain 6, sft 7 files."""
    out = tmp_path_factory.mktemp("exported")
    files = {}
    for split in ("pretrain", "sft"):
        for to in ("webdataset", "hf", "parquet"):
            files[split, to] = export(ExportConfig(data=str(world / f"{split}.json"), to=to,
                                                   out=str(out / f"{split}-{to}"), shard_size=3))
    return files


def read_back(files: list[Path], to: str) -> list:
    if to == "hf":
        return read_hf_dataset(files[0].parent)  # the save_to_disk folder
    if to == "parquet":
        return read_hf_dataset(files[0].parent)  # a folder of parquet files
    return list(ShardStream(files, shuffle=False, epochs=1))


def pixels(image) -> np.ndarray:
    return np.asarray(load_image(image))


def without_position(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != POSITION_KEY}


@pytest.mark.parametrize("to", ["webdataset", "hf", "parquet"])
@pytest.mark.parametrize("split", ["pretrain", "sft"])
def test_same_samples_as_the_json_reader(exported, world, split, to):
    reference = read_dataset(world / f"{split}.json")
    got = read_back(exported[split, to], to)
    assert len(exported[split, to]) == -(-len(reference) // 3)  # shard_size 3
    assert len(got) == len(reference) and len(reference) in (16, 20)
    for ours, theirs in zip(got, reference):
        assert ours.turns == theirs.turns
        assert without_position(ours.meta) == theirs.meta
        assert all(isinstance(image, bytes) for image in ours.images)  # from the file, not a path
        assert len(ours.images) == len(theirs.images) >= 1
        for a, b in zip(ours.images, theirs.images):
            assert np.array_equal(pixels(a), pixels(b)) and image_size(a) == image_size(b)
    assert got[4].source.endswith(":000004" if to == "webdataset" else ":1")  # file 1, row 1


def test_stream_samples_batch_like_file_samples(exported, world, tiny_tokenizer_dir):
    """ChatDataset (the loader) takes bytes where it took paths: the same ids and pixels."""
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    processor = ImageProcessor(32, [0.5] * 3, [0.5] * 3)
    built = [ChatDataset(samples[:6], tokenizer, processor, 4, 512)
             for samples in (read_dataset(world / "sft.json"),
                             read_back(exported["sft", "webdataset"], "webdataset"))]
    for a, b in zip(built[0], built[1]):
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert all((x == y).all() for x, y in zip(a["pixel_values"], b["pixel_values"]))


def test_caption_shard_from_txt_and_image_bytes(tmp_path):
    """img2dataset's layout: KEY.jpg + KEY.txt + KEY.json (metadata), written by webdataset."""
    jpeg = io.BytesIO()
    Image.fromarray(np.full((8, 12, 3), (200, 30, 60), np.uint8)).save(jpeg, format="JPEG")
    with webdataset.TarWriter(str(tmp_path / "captions.tar"), encoder=False) as writer:
        for key, caption in (("000000", "a red square"), ("000001", " two blue circles\n")):
            writer.write({"__key__": key, "jpg": jpeg.getvalue(), "txt": caption.encode(),
                          "json": json.dumps({"url": f"http://x/{key}.jpg", "width": 12}).encode()})
    samples = list(ShardStream(tmp_path / "captions.tar", epochs=1))
    assert [s.turns[1] for s in samples] == [{"role": "assistant", "content": "a red square"},
                                             {"role": "assistant", "content": "two blue circles"}]
    for sample in samples:
        assert sample.turns[0]["role"] == "user"
        assert sample.turns[0]["content"].startswith(f"{IMAGE_TOKEN}\n")
        assert sample.turns[0]["content"][len(IMAGE_TOKEN) + 1:] in PRETRAIN_PROMPTS
        assert without_position(sample.meta)["task"] == "caption"
        assert sample.meta["width"] == 12 and sample.meta["url"].startswith("http://x/")
        assert np.array_equal(pixels(sample.images[0]),
                              np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB")))
    assert samples[1].source == f"{tmp_path / 'captions.tar'}:000001"


def png(colour: tuple) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), colour, np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def test_cauldron_onevision_and_mapped_layouts(tmp_path):
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    cauldron = datasets.Dataset.from_dict({
        "images": [[red, blue]],
        "texts": [[{"user": "Which is red?", "assistant": "The first.", "source": "ai2d"},
                   {"user": "And blue?", "assistant": "The second.", "source": "ai2d"}]]})
    cauldron.cast_column("images", [datasets.Image()]).to_parquet(str(tmp_path / "c.parquet"))
    [sample] = read_hf_dataset(tmp_path / "c.parquet")
    two_images = f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n"  # prepended: the Cauldron's text has none
    assert sample.turns == [{"role": "user", "content": two_images + "Which is red?"},
                            {"role": "assistant", "content": "The first."},
                            {"role": "user", "content": "And blue?"},
                            {"role": "assistant", "content": "The second."}]
    assert [pixels(image)[0, 0].tolist() for image in sample.images] == [[255, 0, 0], [0, 0, 255]]
    assert sample.meta == {"task": "chat", "data_source": "ai2d"}

    conversations = [{"from": "human", "value": f"{IMAGE_TOKEN}\nColour?"},
                     {"from": "gpt", "value": "Red."}]
    onevision = datasets.Dataset.from_dict({
        "id": ["a", "b"], "image": [red, None], "data_source": ["x", "y"],
        "conversations": [conversations, [{"from": "human", "value": "Hi"},
                                          {"from": "gpt", "value": "Hello."}]]})
    onevision.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ov"))
    with_image, text_only = read_hf_dataset(tmp_path / "ov")
    assert with_image.turns[0]["content"] == f"{IMAGE_TOKEN}\nColour?" and text_only.images == []
    assert with_image.meta == {"task": "chat", "id": "a", "data_source": "x"}

    mapped = datasets.Dataset.from_dict({"img": [blue], "q": ["Colour?"], "a": ["Blue."]})
    mapped.cast_column("img", datasets.Image()).to_parquet(str(tmp_path / "m.parquet"))
    [vqa] = read_hf_dataset(tmp_path / "m.parquet", columns="image=img,question=q,answer=a")
    assert vqa.turns == [{"role": "user", "content": f"{IMAGE_TOKEN}\nColour?"},
                         {"role": "assistant", "content": "Blue."}]
    assert vqa.meta == {"task": "vqa"} and pixels(vqa.images[0])[0, 0].tolist() == [0, 0, 255]


def samples_of(stream: ShardStream, num_workers: int) -> list:
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_identity)
    return list(loader)


def _identity(item):
    return item


def test_two_ranks_two_workers_see_each_sample_once_an_epoch(exported, world):
    shards = exported["pretrain", "webdataset"]  # 6 shards of 3, 3, 3, 3, 3, 1 for 4 readers
    every = sorted(s.meta["id"] for s in read_dataset(world / "pretrain.json"))
    seen = []
    for rank in (0, 1):
        stream = ShardStream(shards, rank=rank, world_size=2, num_workers=2, seed=3, epochs=2)
        seen += samples_of(stream, num_workers=2)
    for epoch in (0, 1):
        in_epoch = [s for s in seen if s.meta[POSITION_KEY]["epoch"] == epoch]
        assert sorted(s.meta["id"] for s in in_epoch) == every  # each once: no repeat, no gap
        for reader in range(4):  # reader r read order[r::4] of this epoch's shard order
            read = [s.meta[POSITION_KEY]["shard"] for s in in_epoch
                    if s.meta[POSITION_KEY]["reader"] == reader]
            assert list(dict.fromkeys(read)) == stream.reader_shards(reader, epoch)
    assert stream.epoch_order(0) != stream.epoch_order(1)  # reshuffled every epoch
    assert sorted(stream.epoch_order(1)) == list(range(6))


@pytest.mark.parametrize("to", ["webdataset", "hf", "parquet"])
def test_resume_mid_shard_yields_exactly_the_rest(exported, to):
    shards = exported["sft", to]  # 7 shards (tars, .arrow or parquet files)
    uninterrupted = [s.source for s in ShardStream(shards, seed=1, epochs=2)]
    assert len(uninterrupted) == 40 and len(set(uninterrupted)) == 20
    first = ShardStream(shards, seed=1, epochs=2)
    used = []
    for sample in first:  # stop after 4 samples: inside the second shard of the epoch
        used.append(sample)
        if len(used) == 4:
            break
    first.mark_consumed(stream_positions(used))
    state = json.loads(json.dumps(first.state_dict()))  # as trainer_state.json keeps it
    assert state["readers"]["0"]["index"] == 1 and state["readers"]["0"]["epoch"] == 0
    resumed = ShardStream(shards, seed=1, epochs=2)
    resumed.load_state_dict(state)
    assert [s.source for s in used] + [s.source for s in resumed] == uninterrupted


def test_a_parquet_file_is_entered_at_any_row(exported, world, tmp_path):
    """Resuming inside a file of several row groups: the groups before are skipped unread."""
    import pyarrow.parquet as pq

    table = pq.read_table(exported["sft", "parquet"][0].parent)  # all 20 rows
    pq.write_table(table, tmp_path / "groups.parquet", row_group_size=3)
    assert pq.ParquetFile(tmp_path / "groups.parquet").num_row_groups == 7
    reference = read_dataset(world / "sft.json")
    for start in (0, 5, 6, 19, 20):
        got = list(file_samples(tmp_path / "groups.parquet", start=start))
        assert [index for index, _ in got] == list(range(start, 20))
        assert [s.meta["id"] for _, s in got] == [s.meta["id"] for s in reference[start:]]
        assert all(s.source == f"{tmp_path / 'groups.parquet'}:{i}" for i, s in got)


def test_resume_through_a_dataloader_with_workers_per_reader(exported):
    shards = exported["sft", "webdataset"]

    def per_reader(samples):
        out = {}
        for sample in samples:
            out.setdefault(sample.meta[POSITION_KEY]["reader"], []).append(sample.source)
        return out

    whole = per_reader(samples_of(ShardStream(shards, rank=1, world_size=2, num_workers=2,
                                              epochs=2), 2))
    states, before = [], []
    for rank in (0, 1):
        stream = ShardStream(shards, rank=rank, world_size=2, num_workers=2, epochs=2)
        loader = DataLoader(stream, batch_size=3, num_workers=2, collate_fn=_identity)
        for step, batch in enumerate(loader):  # each batch from one worker, in turn
            stream.mark_consumed(stream_positions(batch))
            before += batch if rank == 1 else []
            if step == 2:
                break
        states.append(stream.state_dict())
    resumed = ShardStream(shards, rank=1, world_size=2, num_workers=2, epochs=2)
    resumed.load_state_dict(merge_states(states))
    after = per_reader(samples_of(resumed, 2))
    done = per_reader(before)
    assert sorted(done) == sorted(after) == sorted(whole) == [2, 3]
    assert all(done[r] + after[r] == whole[r] for r in whole)


def one_line_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as raised:
        call(*args, **kwargs)
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_bad_input_is_one_line_naming_the_file(exported, tmp_path):
    shards = exported["pretrain", "webdataset"]
    missing = str(shards[0].parent / "shard-{000000..000009}.tar")
    one_line_error(r"shard-000006\.tar: shard not found$", ShardStream, missing)

    data = shards[0].read_bytes()
    with tarfile.open(shards[0]) as archive:
        members = archive.getmembers()  # 000000.json, 000000.png, 000000.txt, 000001.json, ...
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:members[3].offset_data + 10])  # inside 000001.json's data
    one_line_error(rf"^{cut}: truncated or corrupt tar at member 000001\.json \(", list,
                   ShardStream(cut, epochs=1))
    cut.write_bytes(data[:members[3].offset])  # at a member's edge: tarfile alone sees no end
    one_line_error(rf"^{cut}: truncated tar \(ends after member 000000\.txt without", list,
                   ShardStream(cut, epochs=1))

    parquet = exported["sft", "parquet"][0]
    one_line_error(rf"^{parquet}: no column 'img' \(named for 'image' in columns\)",
                   read_hf_dataset, parquet, columns="image=img,conversations=conversations")
    table = datasets.Dataset.from_dict({"picture": [png((1, 2, 3))], "words": ["x"]})
    table.to_parquet(str(tmp_path / "odd.parquet"))
    one_line_error(rf"^{tmp_path / 'odd.parquet'}: cannot tell the layout from the columns",
                   read_hf_dataset, tmp_path / "odd.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    one_line_error(rf"^{tmp_path / 'bad.parquet'}: cannot read the parquet file", read_hf_dataset,
                   tmp_path / "bad.parquet")

    one_line_error(r"7 shard\(s\) for 8 readers \(2 rank\(s\) x 4 DataLoader worker\(s\)\)",
                   ShardStream, exported["sft", "webdataset"], world_size=2, num_workers=4)
    stream = ShardStream(shards, num_workers=2)
    one_line_error(r"built for num_workers=2 but is read by a DataLoader with num_workers=0",
                   list, stream)
    other = ShardStream(exported["sft", "webdataset"])
    one_line_error(r"cannot resume the stream, .*num_shards 7 -> 6", stream.load_state_dict,
                   other.state_dict())


def test_a_bad_record_raises_or_is_skipped_with_its_message(tmp_path):
    with webdataset.TarWriter(str(tmp_path / "s.tar"), encoder=False) as writer:
        writer.write({"__key__": "a", "png": png((9, 9, 9))["bytes"], "txt": b"grey"})
        writer.write({"__key__": "b", "png": png((9, 9, 9))["bytes"], "cls": b"3"})
        writer.write({"__key__": "c", "png": png((9, 9, 9))["bytes"], "txt": b"grey again"})
    message = one_line_error(r"s\.tar:b: no \.txt caption and no \.json", list,
                             ShardStream(tmp_path / "s.tar", epochs=1))
    kept = list(ShardStream(tmp_path / "s.tar", epochs=1, skip_bad=True))
    assert [s.turns[1]["content"] for s in kept] == ["grey", "grey again"]
    assert kept[1].meta["skipped"] == [message] and "skipped" not in kept[0].meta
    assert kept[1].meta[POSITION_KEY]["index"] == 3  # the skipped one is behind the resume point


def test_brace_expansion_and_image_bytes():
    assert expand_braces("s-{0008..0011}.tar") == ["s-0008.tar", "s-0009.tar", "s-0010.tar",
                                                   "s-0011.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    encoded = png((10, 20, 30))["bytes"]
    assert load_image(encoded).getpixel((0, 0)) == (10, 20, 30) and image_size(encoded) == (6, 4)
    with pytest.raises(ImageError, match=r"^<5 bytes of image data>: not an image file"):
        load_image(b"hello")
