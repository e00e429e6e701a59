"""The learning-rate schedule: linear warmup, then cosine decay to a floor."""
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
