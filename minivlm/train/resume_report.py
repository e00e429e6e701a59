"""What a resumed run changes: the training settings that differ from its checkpoint's.

`--resume` with the same settings continues bit-exactly. Changing some is the point (a longer
run: `--max-steps 20` after 10), so every change is allowed, but each one is printed with what
it does, because the result is then no longer the uninterrupted run's. (Model fields may not
change at all: trainer.py refuses, using checkpoint.config_differences.)
"""
from __future__ import annotations

DATA_ORDER = "the data order no longer continues the interrupted run's"
NO_EFFECT = "no effect on what is learned"
# What changing each TrainConfig field does to a resumed run; {old}, {new}, {step} and
# {schedule} (the run's --lr-schedule) filled in.
CONSEQUENCES = {
    "max_steps": "the {schedule} schedule is rebuilt over {new} steps; the run continues from "
                 "step {step}",
    "time_budget": "ignored once the probe has fixed the step count (the checkpoint's count "
                   "stays); before that, the new budget fixes it",
    "budget_probe_steps": "ignored once the probe has fixed the step count",
    "mixture_draws": "another mixture is drawn; " + DATA_ORDER,
    "lr": "the learning rate follows the new schedule from step {step}",
    "min_lr": "the learning rate follows the new schedule from step {step}",
    "warmup_steps": "the learning rate follows the new schedule from step {step}",
    "weight_decay": "applies from step {step}",
    # exp_avg and exp_avg_sq are kept and go on with the new betas (bias correction too:
    # 1 - beta**t with the saved t); trainer.py re-applies the flags over the loaded state.
    "adam_beta1": "AdamW's moving averages decay at the new rate from step {step}",
    "adam_beta2": "AdamW's moving averages decay at the new rate from step {step}",
    "lr_schedule": "the learning rate decays along the {new} schedule from step {step}",
    "vision_lr_scale": "the tower's learning rate changes from step {step}",
    "grad_clip": "applies from step {step}",
    "batch_size": "each step sees {new} examples per process; " + DATA_ORDER,
    "grad_accum": "each step averages {new} micro-batches; " + DATA_ORDER,
    "seed": DATA_ORDER,
    "group_by_length": DATA_ORDER,
    "pack": "one example per row, or several packed up to max_seq_len; " + DATA_ORDER,
    "data": "other training data; " + DATA_ORDER,
    "image_dir": "images are looked up elsewhere; " + DATA_ORDER,
    "train": "another set of parameters trains from step {step}",
    "dtype": "other numerics from step {step}",
    "device": "other numerics from step {step}",
    "init_from": "ignored: the weights come from the checkpoint",
    "zero1": "the optimizer state is loaded into the other layout; " + NO_EFFECT,
    "fsdp": "the weights and optimizer state are loaded into the other layout; " + NO_EFFECT,
    "skip_bad": "bad records now stop the run or are left out; " + DATA_ORDER,
    "max_image_pixels": "images that were refused may now be used, or the reverse",
    **{name: NO_EFFECT for name in ("out_dir", "val_data", "eval_every", "save_every",
                                    "log_every", "keep", "num_workers", "ddp", "compile",
                                    "grad_checkpoint", "preload_images",
                                    "cache_image_features", "tokenize_workers",
                                    "data_index_cache")},
}
# How this run starts, not what it trains: these differ from the checkpoint's by design.
RUN_CONTROL = ("resume", "overwrite")


def resume_changes(saved: dict, requested: dict, step: int) -> list[str]:
    """One line per training field whose value differs from the checkpoint's config.json
    ("train" section). A field the checkpoint does not know (it predates the field) is left
    out: there is nothing to compare it with."""
    lines = []
    schedule = requested.get("lr_schedule", "cosine")
    for name, new in requested.items():
        if name in RUN_CONTROL or name not in saved or saved[name] == new:
            continue
        old = saved[name]
        what = CONSEQUENCES.get(name, "the run no longer matches an uninterrupted one")
        lines.append(f"resume: {name} {old!r} -> {new!r}: "
                     + what.format(old=old, new=new, step=step, schedule=schedule))
    if requested.get("max_steps", step + 1) <= step:
        lines.append(f"resume: the checkpoint is at step {step} and --max-steps is "
                     f"{requested['max_steps']}: nothing is left to train")
    return lines
