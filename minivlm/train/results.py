"""results.json: what one training run measured, in one small file beside its checkpoints.

Trainer.fit writes it on the main rank when the run ends, after the final checkpoint, so a run
directory that holds results.json is a finished run (ablate.py skips such a directory when a
sweep is run again). For example, after `train_sft.py --val-data ...`:

    {"stage": "sft",
     "train": {"loss": 0.058, "grad_norm": 0.41},       # loss: mean over the last --log-every
                                                         # window; grad_norm: the last step's
     "val": {"closed_accuracy": 0.706, ...},             # the last validation (with --val-data)
     "tokens_per_s": 13012.5, "images_per_s": 410.2,     # over the optimizer steps
     "tokens": 1234567, "images": 38400,
     "seconds": {"steps": 94.9, "wall": 101.3},         # the steps; all of Trainer.fit
     "step": 1400,
     "curve": [{"step": 500, "seconds": 40.2, "closed_accuracy": 0.61, ...}, ...],  # each val
     "budget": {"seconds": 300, "probe_steps": 10, "seconds_per_step": 0.29, "steps": 1021,
                ...}}                                   # with --time-budget only

`tokens_per_s` divides the tokens of this process's optimizer steps (forward, backward, update;
the main rank's count times the world size, as the logged rate does) by the seconds those steps
took: validation and checkpoint saves are left out of the rate, but not out of `seconds.wall`
(all of Trainer.fit). After `--resume` the totals count the steps this run made, not earlier ones.
"""
from __future__ import annotations

from pathlib import Path

from minivlm.files import write_json_atomic

RESULTS_FILE = "results.json"
# The logged window's own rates and schedule: results.json's rates cover the whole run instead,
# and the learning rate is a function of the flags, not a result.
_WINDOW_ONLY = {"train/tokens_per_s", "train/images_per_s", "train/lr"}


def run_results(stage: str, step: int, scalars: dict, totals: dict, wall_seconds: float,
                world_size: int, extra: dict | None = None) -> dict:
    """The results.json dict. `scalars`: Trainer.fit's last logged values ("train/loss",
    "val/closed_accuracy", ...), grouped here by their prefix; `totals`: this rank's tokens,
    images and optimizer-step seconds."""
    results: dict = {"stage": stage}
    for name, value in scalars.items():
        if name not in _WINDOW_ONLY:
            group, key = name.split("/", 1)
            results.setdefault(group, {})[key] = value
    seconds = max(totals["seconds"], 1e-9)
    tokens, images = totals["tokens"] * world_size, totals["images"] * world_size
    results.update(tokens_per_s=tokens / seconds, images_per_s=images / seconds, tokens=tokens,
                   images=images, seconds={"steps": totals["seconds"], "wall": wall_seconds},
                   step=step, **(extra or {}))
    return results


def write_results(out_dir: str | Path, stage: str, step: int, scalars: dict, totals: dict,
                  wall_seconds: float, world_size: int, extra: dict | None = None) -> dict:
    """Write out_dir/results.json (atomically); returns what it wrote. `extra`: the trainer's
    validation curve and time budget (keys "curve", "budget")."""
    results = run_results(stage, step, scalars, totals, wall_seconds, world_size, extra)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out_dir) / RESULTS_FILE, results)
    return results
