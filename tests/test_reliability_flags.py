"""Numeric flags are range-checked at parse time, and a resumed run says what its flags change."""
import argparse
import ast
import dataclasses
import importlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import train_pretrain
import train_seg
import train_sft
from minivlm.cli import add_config_args, config_from_args
from minivlm.models.presets import MODEL_PRESETS, preset_config
from minivlm.models.transformer import PRESETS, TransformerConfig
from minivlm.ranges import field_range
from minivlm.train.resume_report import resume_changes
from minivlm.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
MODEL_FLAGS = ["--model-preset", "demo-quick", "--batch-size", "4", "--log-every", "1",
               "--warmup-steps", "2"]


# ---------------------------------------------------------------------------- every field
def flag_parsed_configs() -> dict[str, type]:
    """Every class passed to `add_config_args` anywhere in the package or the scripts, found
    in the source, so a config added later is checked without editing this test."""
    files = sorted((REPO / "minivlm").rglob("*.py")) + sorted(REPO.glob("*.py"))
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in files}
    names = {node.args[1].id for tree in trees.values() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and len(node.args) > 1
             and getattr(node.func, "id", getattr(node.func, "attr", "")) == "add_config_args"}
    classes = {}
    for path, tree in trees.items():
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name in names:
                module = ".".join(path.relative_to(REPO).with_suffix("").parts)
                classes[node.name] = getattr(importlib.import_module(module), node.name)
    assert set(classes) == names, f"classes not found: {names - set(classes)}"
    return classes


def test_every_numeric_field_of_every_flag_parsed_config_declares_a_range():
    configs = flag_parsed_configs()
    assert {"TrainConfig", "LoRAConfig", "VisionConfig", "ProjectorConfig", "TransformerConfig",
            "SegConfig", "ShapesConfig", "JudgeConfig", "BertScoreConfig"} <= set(configs)
    missing = []
    for name, config_class in configs.items():
        hints = typing.get_type_hints(config_class)
        missing += [f"{name}.{f.name}" for f in dataclasses.fields(config_class)
                    if f.init and hints[f.name] in (int, float) and field_range(f) is None]
        config_class()  # the defaults are inside their own ranges
    assert missing == [], "declare a range: field(default=..., metadata=at_least(...))"


def test_presets_are_inside_the_ranges():
    for name in MODEL_PRESETS:
        preset_config(name)
    for values in PRESETS.values():
        TransformerConfig(**values)


# ---------------------------------------------------------------------------- the bad flags
@pytest.mark.parametrize("script, flag, value, message", [
    (train_pretrain, "--max-steps", "-5", "--max-steps must be >= 1, got -5"),
    (train_pretrain, "--max-steps", "0", "--max-steps must be >= 1, got 0"),
    (train_pretrain, "--batch-size", "0", "--batch-size must be >= 1, got 0"),
    (train_sft, "--batch-size", "-3", "--batch-size must be >= 1, got -3"),
    (train_seg, "--grad-accum", "0", "--grad-accum must be >= 1, got 0"),
    (train_sft, "--lr", "0", "--lr must be > 0, got 0.0"),
    (train_sft, "--lr", "nan", "--lr must be > 0, got nan"),
    (train_pretrain, "--lm-num-heads", "0", "--lm-num-heads must be >= 1, got 0"),
    (train_seg, "--lora-dropout", "1", "--lora-dropout must be in [0, 1), got 1.0"),
    (train_sft, "--val-limit", "-1", "--val-limit must be >= 1, got -1"),
])
def test_bad_numeric_flags_stop_at_parse_time(script, flag, value, message, tmp_path):
    # Nothing named by --data or --tokenizer exists: the flag must be refused before either
    # is opened.
    argv = ["--data", str(tmp_path / "none.json"), "--tokenizer", str(tmp_path / "none"),
            "--out-dir", str(tmp_path / "run"), flag, value]
    with pytest.raises(ValueError) as error:
        script.main(argv)
    assert str(error.value) == message
    assert not (tmp_path / "run").exists()


def test_negative_batch_size_is_one_line_not_a_hang(tmp_path):
    # This used to spin forever at 100% CPU; the timeout turns a regression into a failure.
    result = subprocess.run([sys.executable, "train_pretrain.py", "--data", "none.json",
                             "--tokenizer", "none", "--out-dir", str(tmp_path / "run"),
                             "--batch-size", "-3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--batch-size must be >= 1, got -3" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_zero_keeps_its_meaning_and_a_long_warmup_stays_legal():
    config = TrainConfig(keep=0, save_every=0, eval_every=0, warmup_steps=100, max_steps=10)
    assert (config.keep, config.warmup_steps) == (0, 100)
    with pytest.raises(ValueError, match=r"^TrainConfig.grad_accum must be >= 1, got 0$"):
        TrainConfig(grad_accum=0)


def test_config_from_args_names_the_flag_and_help_shows_the_range():
    parser = argparse.ArgumentParser()
    add_config_args(parser, TransformerConfig, "lm")
    assert ">= 1" in parser.format_help() and "> 0" in parser.format_help()
    with pytest.raises(ValueError, match=r"^--lm-norm-eps must be > 0, got -1.0$"):
        config_from_args(parser.parse_args(["--lm-norm-eps", "-1"]), TransformerConfig, "lm")


# ---------------------------------------------------------------------------- resume report
def test_resume_changes_names_each_field_and_what_it_changes():
    saved = dataclasses.asdict(TrainConfig(max_steps=10))
    requested = dataclasses.asdict(TrainConfig(max_steps=20, resume=True, log_every=5))
    requested["added_later"] = 1  # a field the checkpoint predates: nothing to compare
    assert resume_changes(saved, requested, step=10) == [
        "resume: max_steps 10 -> 20: the cosine schedule is rebuilt over 20 steps; "
        "the run continues from step 10",
        "resume: log_every 10 -> 5: no effect on what is learned"]
    assert resume_changes(saved, dict(saved, resume=True), step=10) == [
        "resume: the checkpoint is at step 10 and --max-steps is 10: nothing is left to train"]


def test_resumed_run_prints_what_its_changed_flags_change(shapes_dir, tiny_tokenizer_dir,
                                                          tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--data", str(shapes_dir / "pretrain.json"), "--tokenizer", str(tiny_tokenizer_dir),
            "--out-dir", str(run), *MODEL_FLAGS]
    train_pretrain.main(base + ["--max-steps", "2"])
    capsys.readouterr()
    train_pretrain.main(base + ["--max-steps", "3", "--lr", "1e-3", "--resume"])
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("resume:")]
    assert lines == [
        "resume: max_steps 2 -> 3: the cosine schedule is rebuilt over 3 steps; "
        "the run continues from step 2",
        "resume: lr 0.002 -> 0.001: the learning rate follows the new schedule from step 2"]
