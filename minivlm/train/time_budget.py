"""Train for a time, not a step count: the first steps are timed, and they fix the step count.

Comparing two recipes at equal steps favours the slower one (length grouping made SFT steps 35%
faster and was judged at equal steps). With `--time-budget SECONDS` a run times its first
`--budget-probe-steps` optimizer steps, then fixes its step count once:

    steps = probe + floor((SECONDS - seconds of the probe steps) / seconds per step)

where a step's seconds are the mean over the probe's steps after the first (the first one pays for
lazy allocations). From then on the run is an ordinary fixed-step run: the cosine schedule decays
over `steps`, and `steps` is saved in every checkpoint (so `--resume` keeps it) and in
results.json (so `--max-steps steps` reruns it without a clock, bit-exactly: the probe steps lie in
the warmup, where the LR does not depend on the step count; TrainConfig checks it).
Validation and checkpoint saves are not timed: the budget is the optimizer steps' own time.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable


def default_clock() -> float:
    return time.perf_counter()


class StepBudget:
    def __init__(self, seconds: float, probe_steps: int, max_steps: int,
                 clock: Callable[[], float] | None = None):
        self.seconds, self.probe_steps, self.max_steps = seconds, probe_steps, max_steps
        # The tests inject a clock, so the arithmetic is tested without timing anything.
        self.clock = clock or default_clock
        self.durations: list[float] = []  # seconds of each probe step so far
        self.steps: int | None = None  # the fixed count, once the probe is over
        self._started = 0.0

    def begin_step(self) -> None:
        self._started = self.clock()

    def end_step(self) -> int | None:
        """Call after every optimizer step; after the last probe step, returns the step count
        (the caller then `fix`es it, so every rank takes rank 0's)."""
        if self.steps is not None:
            return None
        self.durations.append(self.clock() - self._started)
        if len(self.durations) < self.probe_steps:
            return None
        left = self.seconds - sum(self.durations)
        per_step = self.seconds_per_step
        more = math.floor(left / per_step) if per_step > 0 else self.max_steps
        return min(self.max_steps, self.probe_steps + max(0, more))

    def fix(self, steps: int) -> int:
        """Record the count the run goes with (rank 0's, broadcast to every rank)."""
        self.steps = steps
        return steps

    @property
    def seconds_per_step(self) -> float | None:
        if len(self.durations) < 2:
            return None
        return sum(self.durations[1:]) / (len(self.durations) - 1)

    def state_dict(self) -> dict:
        """What results.json and trainer_state.json record (and a resumed run continues from)."""
        return {"seconds": self.seconds, "probe_steps": self.probe_steps,
                "durations": self.durations, "seconds_per_step": self.seconds_per_step,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.durations, self.steps = list(state["durations"]), state["steps"]
