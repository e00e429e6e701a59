"""The learning-rate schedules: linear warmup, then a decay to a floor (a half cosine, or a
straight line as LISA's DeepSpeed WarmupDecayLR). `SCHEDULES` maps `--lr-schedule` to one."""
from __future__ import annotations

import math


def cosine_warmup_lr(step: int, *, max_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float) -> float:
    """LR at optimizer step `step` (0-based).

    Warmup: max_lr * (step + 1) / warmup_steps, so step 0 already moves the weights.
    Then a half cosine from max_lr down to min_lr over [warmup_steps, total_steps]; min_lr after.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def linear_warmup_lr(step: int, *, max_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float) -> float:
    """LR at optimizer step `step` (0-based): the same warmup as `cosine_warmup_lr`, then a
    straight line from max_lr at warmup_steps down to min_lr at total_steps; min_lr after.

    LISA trains with DeepSpeed's WarmupDecayLR (warmup_type "linear", warmup_min_lr 0), whose
    decay is max_lr * (total - step) / max(1, total - warmup): ours with min_lr=0. Its warmup
    is max_lr * step / warmup, one step behind ours (its step 0 has LR 0 and changes nothing);
    ours is kept so that both shapes share it (a --time-budget probe times the warmup only).
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    remaining = (total_steps - step) / max(1, total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * remaining


SCHEDULES = {"cosine": cosine_warmup_lr, "linear": linear_warmup_lr}  # by --lr-schedule
