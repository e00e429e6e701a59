"""Quiet gaps made loud: every skipped record listed, oversized images refused before decoding,
a mixture that repeats examples inside a batch, ReasonSeg polygons clipped to the image."""
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

import train_pretrain
import train_seg
from minivlm.data.images import ImageError, image_size, load_image
from minivlm.data.mixture import MixtureDataset
from minivlm.data.reasonseg import read_reasonseg_dir
from minivlm.data.skipped import reason_kind, skip_summary, skipped_record

MODEL_FLAGS = ["--model-preset", "demo-quick", "--batch-size", "4", "--log-every", "1",
               "--warmup-steps", "2"]


def huge_blank_png(path: Path, width: int = 10000, height: int = 10000) -> Path:
    """A valid 1-bit PNG that is tiny on disk (about 12 KB) but width x height when decoded;
    written row by row, so making it never holds the image in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    compressor, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)  # filter byte + bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
                     + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------- pixel budget
def test_image_over_the_pixel_budget_is_refused_from_its_header(tmp_path):
    path = huge_blank_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 50_000
    assert image_size(path) == (10000, 10000)  # the header alone, no budget asked
    with pytest.raises(ImageError) as error:
        load_image(path)  # the default budget, as eval.py and chat use it
    assert str(error.value) == (f"{path}: 10000x10000 is 100,000,000 pixels, over the "
                                "max_image_pixels limit of 67,108,864 (not decoded)")
    with pytest.raises(ImageError, match="over the max_image_pixels limit of 99"):
        image_size(path, max_pixels=99)


def test_training_refuses_an_oversized_image_naming_record_and_file(shapes_dir,
                                                                   tiny_tokenizer_dir, tmp_path):
    records = json.loads((shapes_dir / "pretrain.json").read_text())[:8]
    for record in records:
        record["image"] = str(shapes_dir / record["image"])
    records[3]["image"] = str(huge_blank_png(tmp_path / "bomb.png", 100, 100))
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    argv = ["--data", str(data), "--tokenizer", str(tiny_tokenizer_dir), "--out-dir",
            str(tmp_path / "run"), "--max-image-pixels", "5000", *MODEL_FLAGS]
    with pytest.raises(ValueError) as error:
        train_pretrain.main(argv)
    assert str(error.value).startswith(f"{data}:3: {tmp_path / 'bomb.png'}: 100x100 is 10,000 "
                                       "pixels, over the max_image_pixels limit of 5,000")


# ---------------------------------------------------------------------------- --skip-bad
def test_skip_reasons_are_grouped_by_kind():
    assert reason_kind("image 'a.png' not found (looked for x/a.png and x/images/a.png)") \
        == "image '…' not found"
    assert reason_kind("images/b.png: cannot decode PNG in mode RGB (broken data stream)") \
        == "cannot decode PNG in mode RGB"
    assert reason_kind("missing key 'conversations'") == "missing key 'conversations'"
    assert reason_kind("conversations[0]: 'from' should be one of ['gpt', 'human'], found 'bot'") \
        == "'from' should be one of ['gpt', 'human'], found 'bot'"
    assert reason_kind("517 tokens (images included) exceed the context of 256") \
        == "N tokens exceed the context of N"
    assert skipped_record("d.json", "d.json:4: missing key 'image'") == {
        "data": "d.json", "file": "d.json", "index": 4, "reason": "missing key 'image'"}
    assert skipped_record("seg", "seg/a.json: 'text' is empty")["index"] is None
    records = [skipped_record("d.json", f"d.json:{i}: image 'x{i}.png' not found")
               for i in range(3)]
    assert skip_summary(records) == "       3 x image '…' not found"


def test_skip_bad_writes_every_skipped_record_and_counts_reasons(shapes_dir, tiny_tokenizer_dir,
                                                                tmp_path, capsys):
    records = json.loads((shapes_dir / "pretrain.json").read_text())[:12]
    for record in records:
        record["image"] = str(shapes_dir / record["image"])
    records[2]["image"] = "missing_1.png"
    records[5]["image"] = "missing_2.png"
    del records[7]["conversations"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    run = tmp_path / "run"
    train_pretrain.main(["--data", str(data), "--tokenizer", str(tiny_tokenizer_dir),
                         "--out-dir", str(run), "--max-steps", "1", "--skip-bad", *MODEL_FLAGS])
    out = capsys.readouterr().out
    assert f"data {data}: 9 examples, 3 bad records skipped:" in out
    assert "       2 x image '…' not found\n       1 x missing key 'conversations'" in out
    lines = (run / "skipped.jsonl").read_text().splitlines()
    assert [(r["file"], r["index"]) for r in map(json.loads, lines)] == [
        (str(data), 2), (str(data), 5), (str(data), 7)]
    assert json.loads(lines[0])["reason"].startswith("image 'missing_1.png' not found")


# ---------------------------------------------------------------------------- mixture
class Items:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_mixture_says_when_a_batch_must_repeat_examples():
    mixture = MixtureDataset([Items(3), Items(2)], [1.0, 1.0], length=40)
    assert mixture.repeat_note(5) == ""
    assert mixture.repeat_note(8) == ("note: a batch of 8 is larger than the 5 examples of the "
                                      "mixture; batches repeat examples (drawn with replacement)")
    with pytest.raises(ValueError, match="--sample-rates must be numbers >= 0"):
        MixtureDataset([Items(3), Items(2)], [1.0, -1.0], length=4)


def test_train_seg_says_once_that_its_batch_repeats_examples(shapes_dir, tiny_checkpoint,
                                                             tmp_path, capsys):
    train_seg.main(["--init-from", str(tiny_checkpoint), "--data",
                    str(shapes_dir / "reasonseg" / "train"), "--out-dir", str(tmp_path / "run"),
                    "--batch-size", "64", "--max-steps", "1", "--lora-r", "0"])
    out = capsys.readouterr().out
    assert out.count("note: a batch of 64 is larger than the") == 1


# ---------------------------------------------------------------------------- ReasonSeg
def test_reasonseg_polygons_outside_the_image_are_counted(shapes_dir, tmp_path, capsys):
    folder = tmp_path / "seg"
    shutil.copytree(shapes_dir / "reasonseg" / "train", folder)
    first = folder / "000000.json"
    annotation = json.loads(first.read_text())
    annotation["shapes"][0]["points"][0] = [-4, 10]  # off the left edge
    first.write_text(json.dumps(annotation))
    second = folder / "000001.json"
    annotation = json.loads(second.read_text())
    annotation["shapes"][0]["points"][0] = [32, 32]  # on the far corner: inside, not clipped
    second.write_text(json.dumps(annotation))
    samples = read_reasonseg_dir(folder)
    assert [s.meta.get("clipped_polygons", 0) for s in samples[:2]] == [1, 0]
    assert capsys.readouterr().err == (
        f"{folder}: 1 polygon(s) in 1 of {len(samples)} records reach outside their image and "
        f"were clipped to it (first: {first})\n")
