"""LISA's optimiser settings as flags: AdamW's betas, the linear warmup-decay schedule
(DeepSpeed's WarmupDecayLR), and what changing them does to a resumed run."""
import dataclasses

import pytest
import torch

import train_pretrain
from minivlm.train.config import TrainConfig
from minivlm.train.resume_report import resume_changes
from minivlm.train.schedule import SCHEDULES, cosine_warmup_lr, linear_warmup_lr
from minivlm.train.stage import parse_args

MODEL_FLAGS = ["--model-preset", "demo-quick", "--batch-size", "4", "--log-every", "1",
               "--warmup-steps", "2"]


def test_linear_schedule_by_hand():
    kw = dict(max_lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.1)
    # Warmup as the cosine schedule's: (step + 1) / 4.
    assert [linear_warmup_lr(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [linear_warmup_lr(s, **kw) for s in range(4)] == [cosine_warmup_lr(s, **kw)
                                                            for s in range(4)]
    # Then a straight line from 1.0 at step 4 to 0.1 at step 14: 0.09 less per step.
    assert linear_warmup_lr(4, **kw) == pytest.approx(1.0)
    assert linear_warmup_lr(9, **kw) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert linear_warmup_lr(11, **kw) == pytest.approx(0.37)  # 0.1 + 0.9 * 3 / 10
    assert linear_warmup_lr(14, **kw) == 0.1 and linear_warmup_lr(99, **kw) == 0.1
    assert SCHEDULES == {"cosine": cosine_warmup_lr, "linear": linear_warmup_lr}


def test_linear_schedule_is_deepspeeds_warmup_decay_after_warmup():
    """DeepSpeed's WarmupDecayLR (LISA's train_ds.py: warmup_min_lr 0, warmup_max_lr 3e-4,
    warmup_num_steps 100, warmup_type linear), rewritten from its _get_gamma: after warmup
    gamma = max(0, (total - step) / max(1, total - warmup)); lr = gamma * max_lr."""
    max_lr, warmup, total = 3e-4, 100, 500

    def deepspeed(step):
        if step < warmup:
            return max_lr * step / warmup  # one step behind ours (see linear_warmup_lr)
        return max_lr * max(0.0, (total - step) / max(1.0, total - warmup))

    ours = [linear_warmup_lr(s, max_lr=max_lr, warmup_steps=warmup, total_steps=total, min_lr=0)
            for s in range(total + 5)]
    assert ours[warmup:] == pytest.approx([deepspeed(s) for s in range(warmup, total + 5)],
                                          abs=1e-15)
    assert ours[:warmup] == pytest.approx([deepspeed(s + 1) for s in range(warmup)], abs=1e-15)


def test_flags_parse_and_are_range_checked():
    args = parse_args("test", ["--lr-schedule", "linear", "--adam-beta1", "0.8",
                               "--adam-beta2", "0.99", "--min-lr", "0"])
    c = args.train_config
    assert (c.lr_schedule, c.adam_beta1, c.adam_beta2, c.min_lr) == ("linear", 0.8, 0.99, 0.0)
    default = parse_args("test", []).train_config
    assert (default.lr_schedule, default.adam_beta1, default.adam_beta2) == ("cosine", 0.9, 0.95)
    for bad in (["--lr-schedule", "step"], ["--adam-beta2", "1.0"], ["--adam-beta1", "-0.1"]):
        with pytest.raises((ValueError, SystemExit)):
            parse_args("test", bad)
    with pytest.raises(ValueError, match="lr_schedule must be one of cosine, linear"):
        TrainConfig(lr_schedule="step")


def optimizer_groups(run_dir):
    (step_dir,) = sorted(run_dir.glob("step_*"))[-1:]
    return torch.load(step_dir / "optimizer_rank0.pt", weights_only=True)["param_groups"]


def test_betas_and_schedule_reach_the_optimizer_and_survive_resume(shapes_dir,
                                                                    tiny_tokenizer_dir, tmp_path,
                                                                    capsys):
    run = tmp_path / "run"
    base = ["--data", str(shapes_dir / "pretrain.json"), "--tokenizer", str(tiny_tokenizer_dir),
            "--out-dir", str(run), "--lr", "0.002", "--min-lr", "0", "--lr-schedule", "linear",
            *MODEL_FLAGS]
    train_pretrain.main(base + ["--max-steps", "3", "--adam-beta1", "0.8",
                                "--adam-beta2", "0.99"])
    groups = optimizer_groups(run)
    assert groups and all(g["betas"] == (0.8, 0.99) for g in groups)
    capsys.readouterr()
    # Resumed with other betas: this run's flags win over the ones saved in the optimizer state.
    train_pretrain.main(base + ["--max-steps", "6", "--adam-beta2", "0.95", "--resume"])
    groups = optimizer_groups(run)
    assert all(g["betas"] == (0.9, 0.95) for g in groups)
    # The LR of the last step, 5 of 6 (warmup 2): 0.002 * (6 - 5) / (6 - 2) = 0.0005 on the
    # line; the cosine schedule's would be 0.001 * (1 + cos(3 pi / 4)) = 0.000293.
    assert all(g["lr"] == pytest.approx(0.0005, abs=1e-12) for g in groups)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert lines == [
        "resume: max_steps 3 -> 6: the linear schedule is rebuilt over 6 steps; "
        "the run continues from step 3",
        "resume: adam_beta1 0.8 -> 0.9: AdamW's moving averages decay at the new rate "
        "from step 3",
        "resume: adam_beta2 0.99 -> 0.95: AdamW's moving averages decay at the new rate "
        "from step 3"]


def test_resume_report_names_the_new_fields():
    saved = dataclasses.asdict(TrainConfig())
    requested = dataclasses.asdict(TrainConfig(lr_schedule="linear", min_lr=0.0))
    assert resume_changes(saved, requested, step=5) == [
        "resume: min_lr 0.0001 -> 0.0: the learning rate follows the new schedule from step 5",
        "resume: lr_schedule 'cosine' -> 'linear': the learning rate decays along the linear "
        "schedule from step 5"]
