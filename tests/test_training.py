"""The training loop: schedule, exact resume, crash-safe saves, autocast + GradScaler, scripts."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minivlm.train.checkpoint as checkpoint
import train_pretrain
import train_sft
from minivlm.consolidate import consolidate
from minivlm.models.presets import MODEL_PRESETS, preset_config
from minivlm.train.batch_plan import BatchPlan
from minivlm.load import load_vlm
from minivlm.weights.checkpoint import resolve_checkpoint
from minivlm.train.distributed import init_distributed
from minivlm.train.schedule import cosine_warmup_lr
from minivlm.train.stage import parse_args

REPO = Path(__file__).resolve().parents[1]
MODEL_FLAGS = ["--model-preset", "demo-quick", "--batch-size", "4", "--log-every", "1",
               "--warmup-steps", "2"]


def test_cosine_warmup_lr_closed_form():
    kw = dict(max_lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.1)
    assert [cosine_warmup_lr(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_warmup_lr(4, **kw) == pytest.approx(1.0)
    assert cosine_warmup_lr(9, **kw) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert cosine_warmup_lr(11, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.7 * math.pi)))
    assert cosine_warmup_lr(14, **kw) == 0.1 and cosine_warmup_lr(99, **kw) == 0.1


def pretrain(shapes_dir, tokenizer_dir, out, steps, *extra):
    return train_pretrain.main(["--data", str(shapes_dir / "pretrain.json"), "--tokenizer",
                                str(tokenizer_dir), "--out-dir", str(out), "--max-steps",
                                str(steps), *MODEL_FLAGS, *extra])


def weights(run_dir):
    model, _, _ = load_vlm(run_dir)
    return model.state_dict()


def test_resume_is_bit_identical_to_an_uninterrupted_run(shapes_dir, tiny_tokenizer_dir,
                                                         tmp_path):
    # LoRA dropout draws random numbers every step: the RNG must resume exactly too.
    extra = ["--lr", "1e-2", "--grad-accum", "2", "--lm-num-layers", "2", "--lora-r", "2",
             "--lora-dropout", "0.5"]
    pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "full", 6, *extra)
    pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "part", 6, "--save-every", "3",
             "--keep", "0", *extra)
    # Simulate a run that stopped at step 3: drop the final checkpoint, point latest at step 3.
    shutil.rmtree(tmp_path / "part" / "step_000006")
    (tmp_path / "part" / "latest").write_text("step_000003")
    pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "part", 6, "--resume", *extra)
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "part")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0, msg=name)
    step3 = weights(tmp_path / "part" / "step_000003")
    assert any((step3[n] - full[n]).abs().max() > 0 for n in full)  # training did move weights


def test_crash_during_save_leaves_previous_checkpoint_loadable(shapes_dir, tiny_tokenizer_dir,
                                                               tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(shapes_dir, tiny_tokenizer_dir, run, 2)
    before = weights(run)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(checkpoint, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(shapes_dir, tiny_tokenizer_dir, run, 4, "--resume")
    assert resolve_checkpoint(run).name == "step_000002"
    after = weights(run)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


def test_resume_with_a_different_model_config_names_the_field(shapes_dir, tiny_tokenizer_dir,
                                                             tmp_path):
    pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "r", 1)
    with pytest.raises(ValueError, match="lm.dim: 32 in the checkpoint, 48 requested"):
        pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "r", 2, "--resume",
                 "--lm-dim", "48")


def test_fp16_autocast_with_grad_scaler_trains_on_cpu(shapes_dir, tiny_tokenizer_dir, tmp_path):
    """The CUDA mixed-precision path, exercised on CPU at a tiny size (fp16 matmuls are slow
    here): the scaler is active, its state is checkpointed, and the loss goes down."""
    results = pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "fp16", 6, "--dtype", "fp16",
                       "--lr", "1e-2", "--log-every", "6")
    state = json.loads((resolve_checkpoint(tmp_path / "fp16") / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] > 0  # an enabled GradScaler saved its scale
    first = pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "fp32", 1, "--lr", "1e-2")
    assert results["train/loss"] < first["train/loss"]


def test_sft_chains_from_pretrain_and_lora_trains_fewer_parameters(shapes_dir, tiny_tokenizer_dir,
                                                                   tmp_path, capsys):
    pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "pre", 2)
    train_sft.main(["--init-from", str(tmp_path / "pre"), "--data", str(shapes_dir / "sft.json"),
                    "--out-dir", str(tmp_path / "sft"), "--max-steps", "2", "--lora-r", "4",
                    "--batch-size", "4", "--train-extra", "projector",
                    "--val-data", str(shapes_dir / "val.json"), "--val-limit", "4",
                    "--eval-every", "1"])
    printed = capsys.readouterr().out
    assert "LoRA r=4" in printed
    assert "step 1: val/" in printed and "step 2: val/" in printed  # validation every step
    model, _, run_config = load_vlm(tmp_path / "sft")
    assert run_config["lora"]["r"] == 4
    assert any("lora_A" in name for name in model.state_dict())


def test_ddp_zero1_two_ranks_resume_and_consolidate(shapes_dir, tiny_tokenizer_dir, tmp_path):
    """torchrun with 2 gloo ranks: ZeRO-1 shards saved per rank, resume on 2 ranks, then
    consolidate and resume on 1 rank without ZeRO."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", str(REPO / "train_pretrain.py"), "--ddp", "--zero1",
            "--data", str(shapes_dir / "pretrain.json"), "--tokenizer", str(tiny_tokenizer_dir),
            "--out-dir", str(tmp_path / "ddp"), *MODEL_FLAGS, "--batch-size", "2"]
    subprocess.run(base + ["--max-steps", "2"], check=True, env=env, cwd=REPO, timeout=240,
                   capture_output=True)
    ckpt = resolve_checkpoint(tmp_path / "ddp")
    assert {p.name for p in ckpt.glob("optimizer_rank*.pt")} == {"optimizer_rank0.pt",
                                                                  "optimizer_rank1.pt"}
    subprocess.run(base + ["--max-steps", "3", "--resume"], check=True, env=env, cwd=REPO,
                   timeout=240, capture_output=True)
    assert resolve_checkpoint(tmp_path / "ddp").name == "step_000003"
    # Resuming on 1 rank without consolidating is refused with what to do...
    single = ["--data", str(shapes_dir / "pretrain.json"), "--tokenizer", str(tiny_tokenizer_dir),
              "--out-dir", str(tmp_path / "ddp"), *MODEL_FLAGS, "--resume", "--max-steps", "4"]
    with pytest.raises(ValueError, match="minivlm.consolidate"):
        train_pretrain.main(single)
    # ...and works after it.
    consolidate(tmp_path / "ddp")
    train_pretrain.main(single)
    assert resolve_checkpoint(tmp_path / "ddp").name == "step_000004"


def test_batch_plan_covers_each_epoch_once_and_groups_lengths():
    lengths = [(i * 37) % 101 for i in range(256)]
    plan = BatchPlan(lengths, 8, init_distributed(False), seed=0, group_by_length=True)
    epoch = plan.epoch_batches(0)
    assert sorted(i for b in epoch for i in b) == list(range(256))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch)
    shuffled = BatchPlan(lengths, 8, init_distributed(False), 0, False).epoch_batches(0)
    assert spread < 0.3 * sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                              for b in shuffled)
    # Micro-batch m is the same whether the run started at 0 or resumed at m.
    resumed = plan.from_micro_step(40)
    assert next(resumed) == plan.epoch_batches(1)[40 - 32]


def test_a_new_save_is_never_pruned_by_an_older_runs_higher_steps(shapes_dir, tiny_tokenizer_dir,
                                                                   tmp_path):
    run = tmp_path / "run"
    pretrain(shapes_dir, tiny_tokenizer_dir, run, 3)
    (run / "step_000003").rename(run / "step_001400")  # left over from a longer earlier run
    pretrain(shapes_dir, tiny_tokenizer_dir, run, 2, "--keep", "1", "--overwrite")
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000002"]
    assert resolve_checkpoint(run).name == "step_000002"


def test_presets_set_defaults_that_explicit_flags_override():
    args = parse_args("", ["--model-preset", "demo", "--lm-dim", "64", "--vision-layers", "2"])
    assert (args.lm_dim, args.lm_num_layers, args.vision_layers) == (64, 4, 2)
    args = parse_args("", ["--model-preset", "demo", "--lm-preset", "smollm2-135m"])
    assert (args.lm_dim, args.lm_vocab_size, args.vision_width) == (576, 49152, 128)
    for name in MODEL_PRESETS:  # every field a preset names exists
        assert preset_config(name, seg=True).seg.enabled


def test_training_scripts_print_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_sft.main(["--help"])
    assert exit_info.value.code == 0
    assert "--model-preset" in capsys.readouterr().out
