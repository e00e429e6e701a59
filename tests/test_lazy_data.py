"""Real data at real size: records streamed and held as flat arrays, masks and images decoded per
item, a cached index, and loader workers that change nothing that trains.

The memory test builds 20,000 records in a subprocess (so this process's own allocations do not
count) and holds its peak RSS growth to MEMORY_BUDGET_BYTES_PER_RECORD; the training tests compare
weights bit for bit with 0 and 2 DataLoader workers, and across a resume.
"""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import minivlm.data.json_stream as json_stream
import train_pretrain
from minivlm.data.batch import ChatDataset
from minivlm.data.images import ImageProcessor
from minivlm.data.load_data import DataOptions, load_chat_dataset
from minivlm.data.masks import MaskSource, decode_masks
from minivlm.data.readers import read_dataset
from minivlm.data.reasonseg import polygons_to_mask
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.load import load_vlm

REPO = Path(__file__).resolve().parents[1]
MODEL_FLAGS = ["--model-preset", "demo-quick", "--batch-size", "4", "--log-every", "1",
               "--warmup-steps", "2", "--no-preload-images"]
# Peak RSS growth allowed while 20,000 short (caption) records are read, tokenised and stored:
# issue 21's goal of 2 KB a record. Measured: ~0.85 KB (~0.3 KB of it the records' arrays, the
# rest the reader's fixed ~8 MB); the eager path before it grew by ~6.6 KB a record (~19.7 KB
# with its default of preloading one decoded image per record).
MEMORY_BUDGET_BYTES_PER_RECORD = 2048


def processor() -> ImageProcessor:
    return ImageProcessor(32, [0.5] * 3, [0.5] * 3)


def write_llava(path: Path, records: list[dict], copies: int, image_root: Path) -> Path:
    """`copies` records cycled from `records`, each with a new id and an absolute image path."""
    out = []
    for i in range(copies):
        record = dict(records[i % len(records)], id=f"r{i:07d}")
        names = record["image"]
        record["image"] = ([str(image_root / n) for n in names] if isinstance(names, list)
                           else str(image_root / names))
        out.append(record)
    path.write_text(json.dumps(out))
    return path


def items_equal(a: dict, b: dict) -> bool:
    return (a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
            and a["source"] == b["source"]
            and all(torch.equal(x, y) for x, y in zip(a["pixel_values"], b["pixel_values"]))
            and all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"])))


# ---------------------------------------------------------------------------- reading
def test_streamed_json_array_equals_json_loads_at_any_chunk_size(tmp_path, monkeypatch):
    rng = random.Random(0)
    values = [12345678, -1.5e10, 0.25, "a\nb", "é\u2028", True, None, {"a": [1, {"b": "x" * 40}]}]
    path = tmp_path / "a.json"
    for trial in range(40):
        data = [rng.choice(values) for _ in range(rng.randint(0, 9))]
        path.write_text(json.dumps(data, indent=rng.choice([None, 2])), encoding="utf-8")
        for chunk in (1, 3, 7, 64):
            monkeypatch.setattr(json_stream, "CHUNK", chunk)
            assert [v for _, v in json_stream.iter_json_array(path)] == data
    # A syntax error names the file's own line and column, as json.loads of the whole text.
    text = '[\n  {"a": 1},\n  {"a": 2}\n  {"a": 3}\n]'
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    monkeypatch.setattr(json_stream, "CHUNK", 5)
    with pytest.raises(ValueError, match=f"line {expected.value.lineno} column "
                                         f"{expected.value.colno}"):
        list(json_stream.iter_json_array(path))
    path.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="expected a JSON list of records, found dict"):
        list(json_stream.iter_json_array(path))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux's /proc")
def test_building_20k_records_stays_under_the_memory_budget(shapes_dir, tiny_tokenizer_dir,
                                                            tmp_path):
    records = json.loads((shapes_dir / "pretrain.json").read_text())
    data = write_llava(tmp_path / "big.json", records, 20_000, shapes_dir)
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from minivlm.data.images import ImageProcessor
from minivlm.data.load_data import DataOptions, load_chat_dataset
from minivlm.data.load_tokenizer import load_tokenizer

def status(key):  # kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])

tokenizer = load_tokenizer({str(tiny_tokenizer_dir)!r})
processor = ImageProcessor(32, [0.5] * 3, [0.5] * 3)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # the peak restarts from here (Linux >= 4.0)
    f.write("5")
dataset, _ = load_chat_dataset({str(data)!r}, tokenizer, processor, 16, 512, DataOptions())
print(json.dumps({{"grown_kb": status("VmHWM") - before, "records": len(dataset)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, timeout=120)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["records"] == 20_000
    grown = measured["grown_kb"] * 1024
    print(f"peak RSS growth: {grown / 20_000:.0f} B a record")
    assert grown <= 20_000 * MEMORY_BUDGET_BYTES_PER_RECORD, f"{grown / 20_000:.0f} B a record"


def test_tokenising_in_a_pool_gives_the_same_records(shapes_dir, tiny_tokenizer_dir, tmp_path):
    records = json.loads((shapes_dir / "sft.json").read_text())
    data = write_llava(tmp_path / "d.json", records, 600, shapes_dir)  # > 2 chunks of 256
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    alone, pooled = (ChatDataset(read_dataset(data), tokenizer, processor(), 16, 512,
                                 tokenize_workers=workers) for workers in (0, 2))
    for name in ("token_ids", "trained", "token_offsets", "lengths", "image_refs"):
        assert np.array_equal(getattr(alone.records, name), getattr(pooled.records, name)), name
    assert alone.sources() == pooled.sources() and len(alone) == 600


def test_masks_stay_sources_until_an_item_decodes_them(shapes_dir, tiny_tokenizer_dir):
    samples = read_dataset(shapes_dir / "reasonseg" / "train")
    assert samples and all(isinstance(m, MaskSource) for s in samples for m in s.masks)
    dataset = ChatDataset(samples, load_tokenizer(tiny_tokenizer_dir), processor(), 16, 512)
    assert all(isinstance(m, MaskSource) for masks in dataset.records.masks.values()
               for m in masks)
    annotation = json.loads((shapes_dir / "reasonseg" / "train" / "000000.json").read_text())
    expected = polygons_to_mask(annotation["shapes"], 32, 32)
    assert np.array_equal(dataset[0]["masks"][0].numpy(), expected)
    assert np.array_equal(decode_masks(samples[0].masks)[0], expected)


# ---------------------------------------------------------------------------- the index
def test_a_cached_index_gives_the_same_items_and_follows_edits(shapes_dir, tiny_tokenizer_dir,
                                                               tmp_path):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    records = json.loads((shapes_dir / "sft.json").read_text())
    shutil.copytree(shapes_dir / "images", tmp_path / "images")  # so that one can change
    data = tmp_path / "d.json"
    missing = {"image": "none.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                     {"from": "gpt", "value": "yes"}]}
    data.write_text(json.dumps(records + [missing]))
    options = DataOptions(skip_bad=True, index_root=tmp_path / "index", index_min_bytes=0)

    def load(opts=options):
        return load_chat_dataset(str(data), tokenizer, processor(), 16, 512, opts)

    first, origin = load()
    assert origin.startswith("read and indexed in") and len(first.errors) == 1
    again, origin = load()
    assert origin.startswith("index ") and again.errors == first.errors
    assert isinstance(again.records.token_ids, np.memmap)  # mapped, not read into memory
    assert len(again) == len(first) == len(records)
    assert all(items_equal(again[i], first[i]) for i in range(len(first)))
    with pytest.raises(ValueError, match="none.png"):  # without --skip-bad: the first error
        load(DataOptions(index_root=options.index_root, index_min_bytes=0))
    # An image that changed (a different size) is never served from the old index.
    Image.new("RGB", (64, 32)).save(tmp_path / records[0]["image"])
    changed, origin = load()
    assert origin.startswith("read and indexed") and changed.records.images.widths[0] == 64
    # Nor is an edited file.
    data.write_text(json.dumps(records[:5]))
    edited, origin = load()
    assert origin.startswith("read") and len(edited) == 5 and edited.errors == []


# ---------------------------------------------------------------------------- decode-time skips
def truncated_png(path: Path) -> Path:
    """A PNG whose header reads (image_size works) but whose pixels are cut short."""
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:600])
    return path


def test_an_image_that_fails_only_when_decoded_is_replaced_the_same_way_by_any_worker(
        shapes_dir, tiny_tokenizer_dir, tmp_path):
    records = json.loads((shapes_dir / "pretrain.json").read_text())[:8]
    for record in records:
        record["image"] = str(shapes_dir / record["image"])
    records[2]["image"] = str(truncated_png(tmp_path / "cut.png"))
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    preloaded = ChatDataset(read_dataset(data), tokenizer, processor(), 16, 512,
                            preload_images=True, skip_bad=True)
    assert len(preloaded) == 7 and "cut.png" in preloaded.errors[0]  # found before training
    lazy = ChatDataset(read_dataset(data), tokenizer, processor(), 16, 512, skip_bad=True)
    assert len(lazy) == 8 and lazy.errors == []  # the header reads: found only when decoded
    log = tmp_path / "skipped.jsonl"
    lazy.late_skip_log = (log, str(data))
    seen = {}
    for workers in (0, 2):
        loader = DataLoader(lazy, batch_size=None, num_workers=workers)
        seen[workers] = [item["source"] for item in loader]
    lengths = lazy.lengths()
    stand_in = next(j for j in range(3, 8) if lengths[j] <= lengths[2])  # the next one as short
    assert seen[0] == seen[2] and seen[0][2] == f"{data}:{stand_in}"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["file"], r["index"], r["replaced_by"]) for r in lines] == [
        (str(data), 2, f"{data}:{stand_in}")]  # once, though two runs met it
    assert "cannot decode PNG" in lines[0]["reason"]
    # Without --skip-bad, training stops on one line naming the record, from a worker too.
    with pytest.raises(ValueError) as error:
        train_pretrain.main(["--data", str(data), "--tokenizer", str(tiny_tokenizer_dir),
                             "--out-dir", str(tmp_path / "run"), "--max-steps", "2",
                             "--num-workers", "2", *MODEL_FLAGS])
    assert str(error.value).startswith(f"{data}:2: {tmp_path / 'cut.png'}: cannot decode PNG")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------- loader workers
def weights(run_dir: Path) -> dict:
    model, _, _ = load_vlm(run_dir)
    return model.state_dict()


def test_zero_or_two_workers_and_a_resume_train_the_same_weights(shapes_dir, tiny_tokenizer_dir,
                                                                 tmp_path):
    def run(out: Path, workers: int, *extra):
        train_pretrain.main(["--data", str(shapes_dir / "pretrain.json"), "--tokenizer",
                             str(tiny_tokenizer_dir), "--out-dir", str(out), "--max-steps", "4",
                             "--num-workers", str(workers), "--lr", "1e-2", *MODEL_FLAGS,
                             *extra])
    run(tmp_path / "w0", 0)
    run(tmp_path / "w2", 2)
    run(tmp_path / "part", 2, "--save-every", "2", "--keep", "0")
    shutil.rmtree(tmp_path / "part" / "step_000004")  # as if it had stopped at step 2
    (tmp_path / "part" / "latest").write_text("step_000002")
    run(tmp_path / "part", 2, "--resume")
    reference = weights(tmp_path / "w0")
    for other in ("w2", "part"):
        got = weights(tmp_path / other)
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=0, atol=0, msg=name)
    start = weights(tmp_path / "part" / "step_000002")
    assert any((start[n] - reference[n]).abs().max() > 0 for n in reference)  # it trained
