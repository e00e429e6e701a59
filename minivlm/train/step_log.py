"""What the training loop reports between log lines: sums over the steps since the last line,
turned into scalars for TensorBoard, results.json and a one-line progress report."""
from __future__ import annotations

import time

from minivlm.train.distributed import DistributedEnv, all_reduce_mean


class StepWindow:
    """Loss, mask losses, tokens and images summed over the optimizer steps since the last log."""

    def __init__(self):
        self.loss = self.bce = self.dice = 0.0
        self.masked = self.tokens = self.images = self.steps = 0
        self.started = time.time()

    def add_micro_batch(self, out, batch: dict, grad_accum: int) -> None:
        self.loss += float(out.ce_loss) / grad_accum
        if out.mask_bce is not None:  # mask losses average over batches that had masks
            self.bce += float(out.mask_bce)
            self.dice += float(out.mask_dice)
            self.masked += 1
        self.tokens += int(batch["attention_mask"].sum())
        self.images += 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]

    def scalars(self, lr: float, grad_norm: float, env: DistributedEnv, has_seg_head: bool
                ) -> dict[str, float]:
        """The window's means and rates over every rank (collectives: call on every rank)."""
        seconds = max(time.time() - self.started, 1e-9)
        scalars = {"train/loss": all_reduce_mean(self.loss / self.steps, env),
                   "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/tokens_per_s": self.tokens * env.world_size / seconds,
                   "train/images_per_s": self.images * env.world_size / seconds}
        if has_seg_head:
            # Collectives on every rank, whether or not its own batches had masks.
            masked = all_reduce_mean(float(self.masked), env)
            bce, dice = all_reduce_mean(self.bce, env), all_reduce_mean(self.dice, env)
            if masked > 0:
                scalars["train/mask_bce"], scalars["train/mask_dice"] = bce / masked, dice / masked
        return scalars


def step_line(name: str, step: int, max_steps: int, scalars: dict, elapsed: float,
              steps_done: int) -> str:
    """"sft step 50/1000 loss 1.234 bce 0.1 dice 0.2 lr 1.0e-03 9000 tok/s elapsed 20s eta 380s"
    (the log file's progress, where no terminal shows the bar)."""
    eta = elapsed / max(1, steps_done) * (max_steps - step)
    mask = (f" bce {scalars['train/mask_bce']:.3f} dice {scalars['train/mask_dice']:.3f}"
            if "train/mask_bce" in scalars else "")
    return (f"{name} step {step}/{max_steps} loss {scalars['train/loss']:.3f}{mask} "
            f"lr {scalars['train/lr']:.1e} {scalars['train/tokens_per_s']:.0f} tok/s "
            f"elapsed {elapsed:.0f}s eta {eta:.0f}s")
