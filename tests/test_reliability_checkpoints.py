"""Checkpoints under kills and damage: `latest` always names a complete checkpoint (also while a
step directory of the same name is replaced), a rerun into a run directory must say --resume or
--overwrite, a damaged file or a tokenizer that does not fit its model is one line naming the file
(exit code 2, no traceback), and every entry point gets that line from `run_cli`."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_script
import train_pretrain
import train_sft
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.data.sentencepiece_tokenizer import train_sentencepiece
from minivlm.errors import CheckpointError, run_cli
from minivlm.models.build import build_vlm
from minivlm.train.checkpoint import load_optimizer_state, save_checkpoint
from minivlm.train.distributed import init_distributed
from minivlm.train_tokenizer import dataset_texts
from minivlm.load import load_vlm
from minivlm.weights.checkpoint import LATEST, resolve_checkpoint

from conftest import tiny_vlm_config

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--model-preset", "demo-quick", "--batch-size", "4", "--log-every", "1"]
ENTRY_POINTS = ["train_pretrain.py", "train_sft.py", "train_seg.py", "eval.py", "demo.py",
                "minivlm/chat.py", "minivlm/convert.py", "minivlm/consolidate.py",
                "minivlm/train_tokenizer.py", "minivlm/data/shapes/__main__.py"]


def pretrain_argv(shapes_dir, tokenizer_dir, out, steps, *extra) -> list[str]:
    return ["--data", str(shapes_dir / "pretrain.json"), "--tokenizer", str(tokenizer_dir),
            "--out-dir", str(out), "--max-steps", str(steps), *FLAGS, *extra]


def one_error_line(capsys, exit_info, prog: str) -> str:
    """The single stderr line an entry point printed for an expected error (exit code 2)."""
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ")
    return err.strip()


# --- the shared wrapper --------------------------------------------------------------------

def test_run_cli_turns_expected_errors_into_one_line_and_lets_bugs_through(capsys):
    def fails(error):
        def main(argv):
            raise error
        return main

    assert run_cli(lambda argv: argv, ["ok"], prog="tool") == ["ok"]  # main's result comes back
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fails(ValueError("data.json: record 3:\n  'turns' missing")), prog="tool")
    assert one_error_line(capsys, exit_info, "tool") == \
        "tool: error: data.json: record 3: 'turns' missing"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fails(FileNotFoundError(2, "No such file or directory", "runs/x")), prog="tool")
    assert one_error_line(capsys, exit_info, "tool") == \
        "tool: error: runs/x: No such file or directory"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fails(KeyboardInterrupt()), prog="tool")
    assert exit_info.value.code == 130 and capsys.readouterr().err == "tool: interrupted\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(fails(ZeroDivisionError()), prog="tool")


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_entry_point_runs_main_through_run_cli(script):
    tree = ast.parse((REPO / script).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If)
                 and ast.unparse(node.test) == "__name__ == '__main__'")
    assert [ast.unparse(statement) for statement in block.body] == ["run_cli(main)"]


# --- the save sequence ---------------------------------------------------------------------

class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception` blocks)."""


def save(run: Path, model, tokenizer, step: int = 2) -> None:
    save_checkpoint(run, step, model=model, config={"stage": "test",
                                                    "model": model.config.to_dict(), "lora": None},
                    tokenizer=tokenizer, trainer_state={"scaler": {}},
                    optimizer=torch.optim.AdamW(model.parameters()), env=init_distributed(False))


def first_weight(run: Path) -> float:
    model, _, _ = load_vlm(run)
    return float(next(iter(model.parameters())).detach().flatten()[0])


# Each rename or pointer write of `install` is one os.replace in the run directory: killing the
# k-th one covers every gap between two of them.
@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5])
def test_latest_names_a_complete_checkpoint_at_every_point_of_a_replacing_save(
        kill_at, tiny_tokenizer_dir, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = build_vlm(tiny_vlm_config(seg=False), tokenizer)
    run = tmp_path / "run"
    with torch.no_grad():
        next(iter(model.parameters())).fill_(1.0)
    save(run, model, tokenizer)
    with torch.no_grad():
        next(iter(model.parameters())).fill_(2.0)
    replaces, real_replace = [], os.replace

    def replace(src, dst):
        if Path(dst).parent == run:
            replaces.append(Path(dst).name)
            if len(replaces) == kill_at:
                raise Killed
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        save(run, model, tokenizer)  # the same step again: step_000002 is replaced
    monkeypatch.setattr(os, "replace", real_replace)

    ckpt = resolve_checkpoint(run)
    assert ckpt.name.startswith(".") == (kill_at > 1)  # the window this test is about
    assert first_weight(run) in (1.0, 2.0)  # one whole checkpoint, old or new
    load_optimizer_state(ckpt, init_distributed(False), zero1=False)
    # The next save finishes the interrupted one, then leaves no hidden directory behind.
    with torch.no_grad():
        next(iter(model.parameters())).fill_(3.0)
    save(run, model, tokenizer)
    assert (run / LATEST).read_text() == "step_000002" and first_weight(run) == 3.0
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step_000002"]


def test_resolve_checkpoint_follows_a_hidden_latest_and_names_a_missing_one(tiny_checkpoint,
                                                                            tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    (run / "step_000000").rename(run / ".old_step_000000")
    (run / LATEST).write_text(".old_step_000000")
    assert resolve_checkpoint(run) == run / ".old_step_000000"
    (run / LATEST).write_text("step_000300")
    with pytest.raises(ValueError, match="names 'step_000300', which is missing or incomplete"):
        resolve_checkpoint(run)


def test_kill_9_during_saves_never_loses_the_checkpoint(shapes_dir, tiny_tokenizer_dir,
                                                        tmp_path):
    """Real SIGKILLs of training processes at random moments of their saves, up to two in the
    save that replaces the directory `latest` names (eight kills here; the script runs a hundred
    by default and says how to break it)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "kill_during_saves.py"), "--kills", "8",
         "--data", str(shapes_dir / "pretrain.json"), "--tokenizer", str(tiny_tokenizer_dir),
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "8 kills in" in result.stdout and "every checkpoint loaded" in result.stdout


# --- a rerun into the same run directory ---------------------------------------------------

def test_a_rerun_into_a_run_with_checkpoints_needs_resume_or_overwrite(shapes_dir,
                                                                       tiny_tokenizer_dir,
                                                                       tmp_path, capsys):
    run = tmp_path / "run"
    train_pretrain.main(pretrain_argv(shapes_dir, tiny_tokenizer_dir, run, 1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_pretrain.main, pretrain_argv(shapes_dir, tiny_tokenizer_dir, run, 2),
                prog="train_pretrain.py")
    line = one_error_line(capsys, exit_info, "train_pretrain.py")
    assert line.endswith(f"{run} already holds checkpoints (latest: step_000001): pass --resume "
                         "to continue or --overwrite to start over")
    assert resolve_checkpoint(run).name == "step_000001"  # untouched
    with pytest.raises(ValueError, match="not both"):
        train_pretrain.main(pretrain_argv(shapes_dir, tiny_tokenizer_dir, run, 2, "--resume",
                                          "--overwrite"))
    train_pretrain.main(pretrain_argv(shapes_dir, tiny_tokenizer_dir, run, 1, "--overwrite"))
    state = json.loads((resolve_checkpoint(run) / "trainer_state.json").read_text())
    assert state["step"] == 1


# --- damaged checkpoints and mismatched tokenizers -----------------------------------------

@pytest.fixture(scope="module")
def trained_run(shapes_dir, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    train_pretrain.main(pretrain_argv(shapes_dir, tiny_tokenizer_dir, run, 1))
    return run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("use,damaged", [
    ("init-from", "model.safetensors"), ("init-from", "tokenizer/tokenizer.model"),
    ("init-from", "tokenizer/tokenizer_config.json"), ("resume", "model.safetensors"),
    ("resume", "optimizer_rank0.pt"), ("resume", "rng_rank0.pt"),
    ("resume", "trainer_state.json")])
def test_a_truncated_checkpoint_file_is_one_line_naming_it(use, damaged, trained_run, shapes_dir,
                                                          tiny_tokenizer_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    truncate(run / "step_000001" / damaged)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        if use == "init-from":
            run_cli(train_sft.main, ["--init-from", str(run), "--data",
                                     str(shapes_dir / "sft.json"), "--out-dir",
                                     str(tmp_path / "sft"), *FLAGS], prog="train_sft.py")
        else:
            run_cli(train_pretrain.main, pretrain_argv(shapes_dir, tiny_tokenizer_dir, run, 2,
                                                       "--resume"), prog="train_pretrain.py")
    line = one_error_line(capsys, exit_info, "train_sft.py" if use == "init-from"
                          else "train_pretrain.py")
    assert f"{run / 'step_000001' / damaged}: " in line


def test_chat_with_a_truncated_checkpoint_is_one_line_from_the_real_command(trained_run,
                                                                           tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    truncate(run / "step_000001" / "model.safetensors")
    result = subprocess.run([sys.executable, "-m", "minivlm.chat", "--model-path", str(run),
                             "--prompt", "hello", "--device", "cpu"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"chat.py: error: {run / 'step_000001' / 'model.safetensors'}: "
                           "cannot read the weights (")
    assert line.endswith("the file is truncated or damaged")


def with_tokenizer(checkpoint: Path, shapes_dir: Path, out: Path, vocab_size: int) -> Path:
    """A copy of `checkpoint` whose tokenizer/ is a new one with `vocab_size` pieces."""
    shutil.copytree(checkpoint, out)
    tokenizer_dir = next(out.glob("step_*")) / "tokenizer"
    shutil.rmtree(tokenizer_dir)
    texts = dataset_texts([str(shapes_dir / "pretrain.json"), str(shapes_dir / "sft.json")])
    train_sentencepiece(texts * 4, tokenizer_dir, vocab_size=vocab_size)
    return out


def test_a_tokenizer_bigger_than_the_embedding_is_refused_where_the_model_loads(
        tiny_checkpoint, shapes_dir, tmp_path, capsys):
    bad = with_tokenizer(tiny_checkpoint, shapes_dir, tmp_path / "bad", 400)  # model: 360 rows
    problem = "400 pieces, but the model's embedding has only 360 rows"
    with pytest.raises(CheckpointError, match=problem):
        load_vlm(bad)
    common = ["--model-path", str(bad), "--output-path", str(tmp_path / "out.json"),
              "--limit", "1"]
    for mode in (["--vqa-json-path", str(shapes_dir / "eval.json")],
                 ["--seg-dir", str(shapes_dir / "reasonseg" / "test")]):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(eval_script.main, mode + common, prog="eval.py")
        assert problem in one_error_line(capsys, exit_info, "eval.py")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_sft.main, ["--init-from", str(bad), "--data", str(shapes_dir / "sft.json"),
                                 "--out-dir", str(tmp_path / "sft"), *FLAGS], prog="train_sft.py")
    assert problem in one_error_line(capsys, exit_info, "train_sft.py")
    # More rows than pieces is how real models ship (padded embeddings): that loads.
    padded = with_tokenizer(tiny_checkpoint, shapes_dir, tmp_path / "padded", 320)
    _, tokenizer, _ = load_vlm(padded)
    assert tokenizer.vocab_size == 320
