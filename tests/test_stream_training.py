"""Training on real data formats: WebDataset shards as a stream (train/stream_set.py) that resumes
exactly, and Hugging Face datasets (parquet, save_to_disk) through the ordinary map-style path.
The files are written by webdataset and datasets themselves (data/shapes/export.py)."""
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import train_pretrain
import train_sft
from minivlm.data.readers import read_dataset
from minivlm.data.shapes.export import ExportConfig, export
from minivlm.data.shard_stream import ShardStream
from minivlm.load import load_vlm
from minivlm.train.distributed import init_distributed
from minivlm.train.stage import parse_args, training_set
from minivlm.train.stream_set import StreamSet

REPO = Path(__file__).resolve().parents[1]
MODEL_FLAGS = ["--model-preset", "demo-quick", "--batch-size", "4", "--log-every", "1",
               "--warmup-steps", "2", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def shards(shapes_dir, tmp_path_factory) -> Path:
    """The 16 pretrain captions in 4 shards of 5, 5, 5, 1: a batch of 4 ends mid-shard."""
    out = tmp_path_factory.mktemp("wds") / "pretrain"
    files = export(ExportConfig(data=str(shapes_dir / "pretrain.json"), to="webdataset",
                                out=str(out), shard_size=5))
    assert len(files) == 4
    return out


def run(script, data, tokenizer_dir, out, steps, *extra):
    return script.main(["--data", str(data), "--tokenizer", str(tokenizer_dir), "--out-dir",
                        str(out), "--max-steps", str(steps), *MODEL_FLAGS, *extra])


def weights(run_dir) -> dict:
    model, _, _ = load_vlm(run_dir)
    return model.state_dict()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_sft_on_parquet_and_hf_folders_trains_the_json_weights(shapes_dir, tiny_tokenizer_dir,
                                                               tmp_path):
    parquet = tmp_path / "sft-parquet"
    hf = tmp_path / "sft-hf"
    export(ExportConfig(data=str(shapes_dir / "sft.json"), to="parquet", out=str(parquet),
                        shard_size=40))
    export(ExportConfig(data=str(shapes_dir / "sft.json"), to="hf", out=str(hf), shard_size=40))
    # the readers' dispatch: told from the files, or named by the prefix; the same records
    reference = read_dataset(shapes_dir / "sft.json")
    for source in (parquet, f"hf:{parquet}", hf, next(parquet.glob("*.parquet")).parent):
        got = read_dataset(source)
        assert [s.turns for s in got] == [s.turns for s in reference]
        assert [len(s.images) for s in got] == [len(s.images) for s in reference]
    # The images arrive as the PNG files' bytes instead of their paths: the same pixels.
    run(train_sft, shapes_dir / "sft.json", tiny_tokenizer_dir, tmp_path / "json", 3)
    run(train_sft, parquet, tiny_tokenizer_dir, tmp_path / "parquet", 3)
    run(train_sft, f"hf:{hf}", tiny_tokenizer_dir, tmp_path / "hf", 3)
    reference_weights = weights(tmp_path / "json")
    assert_same_weights(reference_weights, weights(tmp_path / "parquet"))
    assert_same_weights(reference_weights, weights(tmp_path / "hf"))


def test_hf_columns_maps_a_dataset_with_other_column_names(shapes_dir, tiny_tokenizer_dir,
                                                           tmp_path):
    import pyarrow.parquet as pq

    parquet = tmp_path / "parquet"
    files = export(ExportConfig(data=str(shapes_dir / "sft.json"), to="parquet",
                                out=str(parquet), shard_size=40))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for file in files:
        table = pq.read_table(file)
        names = ["imgs" if n == "images" else "conv" if n == "conversations" else n
                 for n in table.column_names]
        pq.write_table(table.rename_columns(names), renamed / file.name)
    with pytest.raises(ValueError, match="cannot tell the layout from the columns"):
        run(train_sft, renamed, tiny_tokenizer_dir, tmp_path / "bad", 1)
    results = run(train_sft, renamed, tiny_tokenizer_dir, tmp_path / "ok", 1,
                  "--hf-columns", "images=imgs,conversations=conv")
    assert math.isfinite(results["train/loss"])


def test_pretrain_on_shards_trains(shards, tiny_tokenizer_dir, tmp_path):
    results = run(train_pretrain, shards, tiny_tokenizer_dir, tmp_path / "run", 3)
    assert math.isfinite(results["train/loss"])
    state = json.loads((tmp_path / "run" / "step_000003" / "trainer_state.json").read_text())
    assert state["step"] == 3
    # one reader (no workers): the position after the 12th sample it reads, inside a shard
    twelfth = list(itertools.islice(iter(ShardStream(shards)), 12))[-1]
    expected = {k: twelfth.meta["stream_position"][k] for k in ("epoch", "shard", "index")}
    assert state["stream"]["readers"] == {"0": expected}
    assert 0 < expected["index"] < 5
    # the same shards by brace pattern, by prefix, and by one file each
    for source in (f"{shards}/shard-{{000000..000003}}.tar", f"shards:{shards}"):
        again = run(train_pretrain, source, tiny_tokenizer_dir, tmp_path / "again", 3,
                    "--overwrite")
        assert again["train/loss"] == results["train/loss"]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_mid_shard_is_bit_identical_to_an_uninterrupted_run(shards, tiny_tokenizer_dir,
                                                                   tmp_path, workers):
    extra = ["--num-workers", workers, "--lora-r", "2", "--lora-dropout", "0.5"]
    run(train_pretrain, shards, tiny_tokenizer_dir, tmp_path / "full", 6, *extra)
    run(train_pretrain, shards, tiny_tokenizer_dir, tmp_path / "part", 6, "--save-every", "3",
        "--keep", "0", *extra)
    # Simulate a run that stopped at step 3: drop the final checkpoint, point latest at step 3.
    shutil.rmtree(tmp_path / "part" / "step_000006")
    (tmp_path / "part" / "latest").write_text("step_000003")
    run(train_pretrain, shards, tiny_tokenizer_dir, tmp_path / "part", 6, "--resume", *extra)
    full = weights(tmp_path / "full")
    assert_same_weights(full, weights(tmp_path / "part"))
    step3 = weights(tmp_path / "part" / "step_000003")
    assert any((step3[n] - full[n]).abs().max() > 0 for n in full)  # training moved weights


def test_the_saved_position_is_what_resumes_exactly(shards, tiny_tokenizer_dir, tmp_path):
    """Reset the saved position to the stream's start and the resumed weights differ."""
    run(train_pretrain, shards, tiny_tokenizer_dir, tmp_path / "full", 4)
    run(train_pretrain, shards, tiny_tokenizer_dir, tmp_path / "part", 4, "--save-every", "2",
        "--keep", "0")
    shutil.rmtree(tmp_path / "part" / "step_000004")
    (tmp_path / "part" / "latest").write_text("step_000002")
    state_file = tmp_path / "part" / "step_000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["stream"]["readers"]["0"] = dict(epoch=0, index=0,
                                           shard=ShardStream(shards).reader_shards(0, 0)[0])
    state_file.write_text(json.dumps(state))
    run(train_pretrain, shards, tiny_tokenizer_dir, tmp_path / "part", 4, "--resume")
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert any((resumed[n] - full[n]).abs().max() > 0 for n in full)


@pytest.mark.parametrize("flags, match", [
    (["--pack"], "--pack needs a dataset with a length"),
    (["--group-by-length"], "--group-by-length needs a dataset with a length"),
    (["--sample-rates", "1"], "--sample-rates needs a dataset with a length"),
    (["--preload-images"], "--preload-images needs a dataset with a length"),
])
def test_what_a_stream_cannot_do_is_refused_in_one_line(shards, tiny_tokenizer_dir, tmp_path,
                                                        flags, match):
    with pytest.raises(ValueError, match=match) as caught:
        run(train_pretrain, shards, tiny_tokenizer_dir, tmp_path / "run", 1, *flags)
    assert "\n" not in str(caught.value)


def test_a_stream_beside_other_data_is_refused(shards, shapes_dir, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot be mixed with other --data entries"):
        run(train_sft, f"{shards},{shapes_dir / 'sft.json'}", tiny_tokenizer_dir,
            tmp_path / "run", 1)
    with pytest.raises(ValueError, match="cannot be mixed with other --data entries"):
        run(train_sft, f"{shapes_dir / 'sft.json'},{shards}", tiny_tokenizer_dir,
            tmp_path / "run", 1)


def test_a_bad_sample_stops_the_run_or_is_skipped_and_reported(shards, tiny_tokenizer_dir,
                                                                tmp_path):
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    with tarfile.open(bad / "shard-000000.tar") as archive:  # a good image, a too-long caption
        image = next(archive.extractfile(m).read() for m in archive if m.name.endswith(".png"))
    with tarfile.open(bad / "shard-000000.tar", "a") as archive:
        for name, data in (("toolong.png", image), ("toolong.txt", b"red " * 2000)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"shard-000000.tar:toolong: \d+ tokens .* exceed the "
                                         "context") as caught:
        run(train_pretrain, bad, tiny_tokenizer_dir, tmp_path / "strict", 5)
    assert "\n" not in str(caught.value)
    results = run(train_pretrain, bad, tiny_tokenizer_dir, tmp_path / "lenient", 5, "--skip-bad")
    assert math.isfinite(results["train/loss"])
    (skipped,) = [json.loads(line) for line in
                  (tmp_path / "lenient" / "skipped.jsonl").read_text().splitlines()]
    assert skipped["file"].endswith("shard-000000.tar:toolong")
    assert "exceed the context" in skipped["reason"]


def test_parquet_files_stream_with_the_shards_prefix(shapes_dir, tiny_tokenizer_dir, tmp_path):
    parquet = tmp_path / "parquet"
    export(ExportConfig(data=str(shapes_dir / "pretrain.json"), to="parquet", out=str(parquet),
                        shard_size=5))
    results = run(train_pretrain, f"shards:{parquet}", tiny_tokenizer_dir, tmp_path / "run", 2)
    assert math.isfinite(results["train/loss"])
    state = json.loads((tmp_path / "run" / "step_000002" / "trainer_state.json").read_text())
    assert state["stream"]["num_shards"] == 4


def test_a_stage_that_always_mixes_refuses_a_stream(shards, tiny_tokenizer_dir):
    args = parse_args("train_seg", ["--data", str(shards), "--tokenizer", str(tiny_tokenizer_dir)])
    stream = StreamSet(ShardStream(shards), None, None, 1, 1, 1, name=str(shards))
    with pytest.raises(ValueError, match="draws a mixture, which a stream of shards cannot"):
        training_set([stream], args, init_distributed(False, "cpu"), always_mix=True)


def test_two_ranks_save_both_readers_positions(shards, tiny_tokenizer_dir, tmp_path):
    """torchrun with 2 gloo ranks: trainer_state.json holds both ranks' readers (gathered), each
    at the sample after the last one its rank trained."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", str(REPO / "train_pretrain.py"), "--ddp", "--data", str(shards),
            "--tokenizer", str(tiny_tokenizer_dir), "--out-dir", str(tmp_path / "ddp"),
            *MODEL_FLAGS, "--batch-size", "2", "--num-workers", "0"]

    def expected(samples_per_rank: int) -> dict:
        positions = {}
        for rank in (0, 1):
            stream = ShardStream(shards, rank=rank, world_size=2)
            last = list(itertools.islice(iter(stream), samples_per_rank))[-1]
            positions[str(rank)] = {k: last.meta["stream_position"][k]
                                    for k in ("epoch", "shard", "index")}
        return positions

    subprocess.run(base + ["--max-steps", "3", "--save-every", "2"], check=True, env=env,
                   cwd=REPO, timeout=240, capture_output=True)
    for steps in (2, 3):
        state = json.loads((tmp_path / "ddp" / f"step_{steps:06d}" / "trainer_state.json")
                           .read_text())
        assert state["stream"]["readers"] == expected(2 * steps)
