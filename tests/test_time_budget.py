"""--time-budget: the step count fixed from the first steps' seconds (an injected clock, nothing
timed), recorded, reproduced by --max-steps, and kept by --resume."""
import json
import shutil

import pytest
import torch

import minivlm.train.time_budget as time_budget
import train_pretrain
from minivlm.load import load_vlm
from minivlm.train.config import TrainConfig
from minivlm.train.time_budget import StepBudget

FLAGS = ["--model-preset", "demo-quick", "--batch-size", "4", "--log-every", "1",
         "--warmup-steps", "4", "--lr", "1e-2"]


class FakeClock:
    """Each reading is `tick` seconds after the previous one: a step (two readings) lasts tick."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_budget_fixes_the_step_count_from_the_probe_steps():
    durations = [5.0, 1.0, 2.0, 3.0, 9.0]  # the first step pays for warm-up: left out of the mean
    clock_values = []
    for d in durations:
        clock_values += [0.0, d]
    budget = StepBudget(seconds=31.0, probe_steps=4, max_steps=1000,
                        clock=iter(clock_values).__next__)
    fixed = []
    for _ in range(4):
        budget.begin_step()
        fixed.append(budget.end_step())
    # 2 s per step; 31 - 11 s of probe leaves 20 s = 10 more steps
    assert fixed == [None, None, None, 14]
    assert budget.seconds_per_step == 2.0 and budget.steps is None
    assert budget.fix(14) == 14 and budget.state_dict()["steps"] == 14
    budget.begin_step()
    assert budget.end_step() is None  # fixed once


def test_budget_is_capped_by_max_steps_and_never_below_the_probe():
    for seconds, expected in ((1e6, 50), (0.5, 3)):
        budget = StepBudget(seconds=seconds, probe_steps=3, max_steps=50, clock=FakeClock(1.0))
        for _ in range(3):
            budget.begin_step()
            result = budget.end_step()
        assert result == expected


def test_probe_steps_must_lie_in_the_warmup():
    with pytest.raises(ValueError, match="must lie in the warmup"):
        TrainConfig(time_budget=60, budget_probe_steps=10, warmup_steps=5)
    TrainConfig(time_budget=60, budget_probe_steps=5, warmup_steps=5)  # fine


def pretrain(shapes_dir, tokenizer_dir, out, *extra):
    train_pretrain.main(["--data", str(shapes_dir / "pretrain.json"), "--tokenizer",
                         str(tokenizer_dir), "--out-dir", str(out), *FLAGS, *extra])
    return json.loads((out / "results.json").read_text())


def weights(run_dir):
    return load_vlm(run_dir)[0].state_dict()


def test_budgeted_run_is_reproduced_by_max_steps_and_kept_by_resume(
        shapes_dir, tiny_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(time_budget, "default_clock", FakeClock(0.5))  # every step 0.5 s
    budget = ["--time-budget", "6", "--budget-probe-steps", "3", "--max-steps", "100"]
    timed = pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "timed", *budget)
    # 3 probe steps (1.5 s), then 4.5 s / 0.5 s = 9 more
    assert timed["budget"]["steps"] == 12 and timed["step"] == 12
    assert timed["budget"]["seconds_per_step"] == pytest.approx(0.5)

    pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "fixed", "--max-steps", "12")
    expected = weights(tmp_path / "timed")
    for name, value in weights(tmp_path / "fixed").items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)

    assert timed["budget"]["rerun"] == "--max-steps 12"

    # Stopped at step 8, resumed on a machine twice as slow: the recorded 12 steps stay.
    part = tmp_path / "part"
    pretrain(shapes_dir, tiny_tokenizer_dir, part, *budget, "--save-every", "8", "--keep", "0")
    shutil.rmtree(part / "step_000012")
    (part / "latest").write_text("step_000008")
    monkeypatch.setattr(time_budget, "default_clock", FakeClock(1.0))
    resumed = pretrain(shapes_dir, tiny_tokenizer_dir, part, *budget, "--resume")
    assert resumed["step"] == 12 and resumed["budget"]["steps"] == 12
    for name, value in weights(part).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    # ...and without --time-budget on the resume: the count its probe fixed still stays.
    shutil.rmtree(part / "step_000012")
    (part / "latest").write_text("step_000008")
    plain = pretrain(shapes_dir, tiny_tokenizer_dir, part, "--max-steps", "100", "--resume")
    assert plain["step"] == 12
    # A budget added to a run that had none would time steps outside its warmup: refused.
    pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "plain", "--max-steps", "3",
             "--save-every", "2", "--keep", "0")
    shutil.rmtree(tmp_path / "plain" / "step_000003")
    (tmp_path / "plain" / "latest").write_text("step_000002")
    with pytest.raises(ValueError, match="without one"):
        pretrain(shapes_dir, tiny_tokenizer_dir, tmp_path / "plain", *budget, "--resume")
