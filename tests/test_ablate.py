"""ablate.py: the grid, the per-run files, the table's statistics, failures, reruns, refusals,
and one real sweep of a tiny pretraining stage."""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import ablate
from minivlm.sweep import flatten, markdown_table, parse_vary, variant_grid

REPO = Path(__file__).resolve().parents[1]

# A stand-in training script: deterministic results from --x, --y, --fast and --seed; x < 0
# fails the way our scripts do (one error line, exit code 2), y = quiet exits 0 without results.
# Each call is appended to calls.log.
TOY = '''
import argparse, json, os, pathlib, sys
parser = argparse.ArgumentParser()
parser.add_argument("--out-dir", required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--x", type=float, default=1.0)
parser.add_argument("--y", default="a")
parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False)
args = parser.parse_args()
with open(pathlib.Path(__file__).parent / "calls.log", "a") as calls:
    calls.write(args.out_dir + "\\n")
if args.y == "quiet":
    sys.exit(0)
if args.x < 0:
    print("loading data")
    print("toy.py: error: --x must be >= 0, got", args.x, file=sys.stderr)
    sys.exit(2)
loss = args.x * 10 + args.seed ** 2 + (0.5 if args.y == "b" else 0.0)
results = {"stage": "toy", "train": {"loss": loss}, "val": {"acc": args.x / (args.seed + 1)},
           "fast": 1.0 if args.fast else 0.0, "ok": True,
           "threads": int(os.environ["OMP_NUM_THREADS"])}
out = pathlib.Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps(results))
'''


@pytest.fixture
def toy(tmp_path) -> list[str]:
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    return [sys.executable, str(script)]


def calls(toy) -> list[str]:
    log = Path(toy[1]).parent / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def sweep(out, toy, *flags):
    return ablate.main(["--out", str(out), *flags, "--", *toy])


def test_grid_names_and_value_forms():
    assert parse_vary("--lr=1e-3,3e-3") == ("lr", ["1e-3", "3e-3"])
    assert parse_vary("sample-rates=6,3,1;1,1,1") == ("sample-rates", ["6,3,1", "1,1,1"])
    grid = variant_grid([("lr", ["1e-3", "3e-3"]), ("data", ["a/b.json", "c.json"])])
    assert [v.name for v in grid] == ["baseline", "data=c.json", "lr=3e-3",
                                      "lr=3e-3+data=c.json"]
    assert grid[0].flags == (("lr", "1e-3"), ("data", "a/b.json"))
    assert variant_grid([("data", ["x", "a/b"])])[1].name == "data=a_b"
    # a directory name goes into comma-separated --data lists: never a comma in it
    assert variant_grid([("sample-rates", ["1,1", "6,3,1"])])[1].name == "sample-rates=6_3_1"
    assert flatten({"a": 1, "b": {"c": 2.5, "d": "text", "e": True}, "f": float("nan")}) == {
        "a": 1.0, "b.c": 2.5}


def test_two_by_two_grid_table_matches_the_run_files(tmp_path, toy):
    out = tmp_path / "abl"
    summary = sweep(out, toy, "--seeds", "0,1", "--vary", "x=1,2", "--vary", "y=a,b",
                    "--jobs", "2")
    names = ["baseline", "y=b", "x=2", "x=2+y=b"]
    assert [row["variant"] for row in summary["variants"]] == names
    assert summary["failed_runs"] == 0
    assert len(calls(toy)) == 8
    rows = {row["variant"]: row for row in summary["variants"]}
    for name in names:
        runs = [json.loads((out / name / f"seed{s}" / "results.json").read_text())
                for s in (0, 1)]
        assert (out / name / "seed0" / "log.txt").is_file()
        assert rows[name]["seeds"] == [0, 1]
        for metric, values in (("train.loss", [r["train"]["loss"] for r in runs]),
                               ("val.acc", [r["val"]["acc"] for r in runs])):
            stat = rows[name]["metrics"][metric]
            assert stat["mean"] == pytest.approx(statistics.fmean(values))
            assert stat["std"] == pytest.approx(statistics.stdev(values))
            assert stat["n"] == 2
        assert rows[name]["wall_seconds"]["n"] == 2
    # loss = 10x + seed^2 + 0.5 [y=b]: seeds 0, 1 -> mean 10x + 0.5 (+0.5), sample std sqrt(0.5)
    assert rows["x=2+y=b"]["metrics"]["train.loss"]["mean"] == pytest.approx(21.0)
    assert rows["x=2+y=b"]["metrics"]["train.loss"]["std"] == pytest.approx(math.sqrt(0.5))
    assert rows["x=2+y=b"]["metrics"]["train.loss"]["delta"] == pytest.approx(10.5)
    assert rows["y=b"]["metrics"]["train.loss"]["delta"] == pytest.approx(0.5)
    assert rows["baseline"]["metrics"]["train.loss"]["delta"] is None
    assert rows["y=b"]["wall_seconds"]["delta"] == pytest.approx(
        rows["y=b"]["wall_seconds"]["mean"] - rows["baseline"]["wall_seconds"]["mean"])
    # --jobs 2 splits the CPUs between the two runs at a time
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert rows["baseline"]["metrics"]["threads"]["mean"] == max(1, cpus // 2)
    assert json.loads((out / "results.json").read_text()) == summary
    table = (out / "results.md").read_text()
    assert "| variant | runs | train.loss | val.acc |" in table
    assert "| x=2+y=b | 2/2 | 21 ± 0.7071 (+10.5) |" in table
    assert json.loads((out / "sweep.json").read_text())["vary"] == [["x", ["1", "2"]],
                                                                    ["y", ["a", "b"]]]


def test_failed_variant_is_recorded_and_a_rerun_does_only_what_is_left(tmp_path, toy):
    out = tmp_path / "abl"
    summary = sweep(out, toy, "--vary", "x=1,-1,3")
    assert summary["failed_runs"] == 1
    rows = {row["variant"]: row for row in summary["variants"]}
    assert rows["x=-1"]["failed"] == {"0": "toy.py: error: --x must be >= 0, got -1.0"}
    assert rows["x=-1"]["seeds"] == [] and rows["x=-1"]["metrics"] == {}
    assert rows["x=3"]["metrics"]["train.loss"]["mean"] == 30.0  # the sweep went on
    assert rows["x=3"]["metrics"]["train.loss"]["std"] is None  # one seed: no sample std
    assert "- x=-1/seed0: toy.py: error: --x must be >= 0" in (out / "results.md").read_text()
    finished = (out / "baseline" / "seed0" / "results.json").stat().st_mtime_ns
    # Again: only the failed run is retried; then a new seed runs only that seed's variants.
    summary = sweep(out, toy, "--vary", "x=1,-1,3")
    assert calls(toy)[3:] == [str(out / "x=-1" / "seed0")]
    assert summary["failed_runs"] == 1
    assert (out / "baseline" / "seed0" / "results.json").stat().st_mtime_ns == finished
    summary = sweep(out, toy, "--seeds", "0,1", "--vary", "x=1,-1,3")
    assert sorted(calls(toy)[4:]) == sorted(str(out / n / s) for n, s in
                                            [("baseline", "seed1"), ("x=-1", "seed0"),
                                             ("x=-1", "seed1"), ("x=3", "seed1")])
    assert summary["variants"][0]["metrics"]["train.loss"]["std"] == pytest.approx(
        statistics.stdev([10.0, 11.0]))


def test_a_run_that_exits_0_without_results_failed(tmp_path, toy):
    summary = sweep(tmp_path / "abl", toy, "--vary", "y=a,quiet")
    assert summary["variants"][1]["failed"] == {"0": "exited 0 without writing results.json"}


def test_true_false_values_switch_a_flag(tmp_path, toy):
    summary = sweep(tmp_path / "abl", toy, "--vary", "fast=false,true")
    assert [(row["variant"], row["metrics"]["fast"]["mean"]) for row in summary["variants"]] == [
        ("baseline", 0.0), ("fast=true", 1.0)]
    run = json.loads((tmp_path / "abl" / "baseline" / "seed0" / "run.json").read_text())
    assert run["command"][-1] == "--no-fast" and run["error"] is None


@pytest.mark.parametrize("flags, message", [
    (["--vary", "z=1,2"], "--vary z: .* has no --z"),
    (["--vary", "x="], "--vary x=: give one or more non-empty values"),
    (["--vary", "x"], "expected FLAG=V1,V2"),
    (["--vary", "seed=1,2"], "sets --seed itself"),
    (["--vary", "x=1,2", "--vary", "x=3"], "names a flag twice"),
    (["--seeds", "0,a"], "--seeds 0,a: expected comma-separated integers"),
])
def test_bad_input_is_refused_before_any_run(tmp_path, toy, flags, message):
    with pytest.raises(ValueError, match=message):
        sweep(tmp_path / "abl", toy, *flags)
    assert calls(toy) == [] and not (tmp_path / "abl").exists()


def test_a_different_sweep_in_the_directory_is_refused_unless_forced(tmp_path, toy):
    out = tmp_path / "abl"
    sweep(out, toy, "--vary", "x=1,2")
    with pytest.raises(ValueError, match="holds a different sweep \\(the --vary lists differ"):
        sweep(out, toy, "--vary", "x=1,4")
    assert len(calls(toy)) == 2
    summary = sweep(out, toy, "--vary", "x=1,4", "--force")
    assert [row["variant"] for row in summary["variants"]] == ["baseline", "x=4"]
    assert not (out / "x=2").exists() and len(calls(toy)) == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no sweep.json"):
        sweep(tmp_path / "other", toy, "--force")
    # From the command line: one line on stderr, exit code 2, as every entry point.
    done = subprocess.run([sys.executable, str(REPO / "ablate.py"), "--out", str(tmp_path / "b"),
                           "--vary", "nope=1,2", "--", *toy], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"ablate.py: error: --vary nope: {' '.join(toy)} has no --nope (not in its --help)"]


def test_a_flag_named_only_in_the_help_description_is_not_accepted(tmp_path, toy):
    Path(toy[1]).write_text(TOY.replace("argparse.ArgumentParser()", "argparse.ArgumentParser("
                                        "description='unlike train.py --bogus, this one...')"))
    with pytest.raises(ValueError, match="--vary bogus: .* has no --bogus"):
        sweep(tmp_path / "abl", toy, "--vary", "bogus=1,2")
    assert calls(toy) == []


def test_one_at_a_time_sweep_runs_the_baseline_and_one_directory_per_change(tmp_path, toy):
    out = tmp_path / "abl"
    summary = sweep(out, toy, "--one-at-a-time", "--vary", "x=1,2", "--vary", "y=a,b")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["baseline", "x=2", "y=b"]
    assert [row["variant"] for row in summary["variants"]] == ["baseline", "x=2", "y=b"]
    assert len(calls(toy)) == 3 and summary["failed_runs"] == 0


def test_real_sweep_of_a_tiny_pretraining_stage(shapes_dir, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "abl"
    command = [sys.executable, str(REPO / "train_pretrain.py"), "--data",
               str(shapes_dir / "pretrain.json"), "--tokenizer", str(tiny_tokenizer_dir),
               "--max-steps", "2", "--model-preset", "demo-quick", "--batch-size", "4",
               "--log-every", "1", "--warmup-steps", "2"]
    summary = sweep(out, command, "--vary", "lr=1e-3,3e-3", "--jobs", "2")
    assert summary["failed_runs"] == 0, summary
    for name in ("baseline", "lr=3e-3"):
        results = json.loads((out / name / "seed0" / "results.json").read_text())
        assert results["stage"] == "pretrain" and results["step"] == 2
        assert math.isfinite(results["train"]["loss"]) and results["train"]["loss"] > 0
        assert results["tokens_per_s"] == pytest.approx(results["tokens"]
                                                        / results["seconds"]["steps"])
        assert results["tokens"] > 0 and results["seconds"]["wall"] >= results["seconds"]["steps"]
        assert any((out / name / "seed0" / "tensorboard").iterdir())
    rows = {row["variant"]: row for row in summary["variants"]}
    assert set(rows) == {"baseline", "lr=3e-3"}
    assert rows["lr=3e-3"]["metrics"]["train.loss"]["delta"] == pytest.approx(
        rows["lr=3e-3"]["metrics"]["train.loss"]["mean"]
        - rows["baseline"]["metrics"]["train.loss"]["mean"])
    assert "| lr=3e-3 | 1/1 |" in (out / "results.md").read_text()


def test_one_at_a_time_runs_the_baseline_and_each_change_alone():
    variants = variant_grid([("lr", ["1", "2", "3"]), ("layers", ["2", "4"])], one_at_a_time=True)
    assert [v.name for v in variants] == ["baseline", "lr=2", "lr=3", "layers=4"]
    assert [dict(v.flags) for v in variants] == [
        {"lr": "1", "layers": "2"}, {"lr": "2", "layers": "2"}, {"lr": "3", "layers": "2"},
        {"lr": "1", "layers": "4"}]


def test_columns_pick_and_order_the_tables_metrics_by_pattern():
    rows = [{"variant": "baseline", "seeds": [0], "failed": {}, "wall_seconds": None,
             "metrics": {name: {"mean": value, "std": None, "delta": None}
                         for name, value in (("seconds.sft", 3.0), ("loss", 1.5),
                                             ("seconds.seg", 4.0), ("acc", 0.25))}}]
    table = markdown_table(rows, "t", [0], ["acc", "seconds.*"])
    assert "| variant | runs | acc | seconds.sft | seconds.seg | wall (s) |" in table
    assert "| baseline | 1/1 | 0.25 | 3 | 4 | — |" in table
