"""Merge a ZeRO-1 or FSDP checkpoint's per-rank optimizer shards into one full optimizer state.

    python -m minivlm.consolidate runs/sft            # the run's latest checkpoint
    python -m minivlm.consolidate runs/sft/step_000500

Writes optimizer_full.pt beside the shards: a plain AdamW state dict over all parameters, from
which a run resumes at any world size, with --zero1, --fsdp or neither.
"""
from __future__ import annotations

import argparse

import torch

from minivlm.errors import run_cli
from minivlm.files import atomic_path
from minivlm.train.checkpoint import load_tensor_file, read_trainer_state
from minivlm.train.fsdp import merge_fsdp_shards
from minivlm.train.zero import merge_shards
from minivlm.weights.checkpoint import resolve_checkpoint


def consolidate(path) -> str:
    ckpt = resolve_checkpoint(path)
    state = read_trainer_state(ckpt)
    ranks = state["world_size"] if state.get("sharded_optimizer") else 1  # else rank 0 wrote it
    files = [ckpt / f"optimizer_rank{r}.pt" for r in range(ranks)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{ckpt}: shard(s) {', '.join(missing)} missing; this checkpoint is "
                         "incomplete and cannot be consolidated")
    shards = [load_tensor_file(f) for f in files]
    out = ckpt / "optimizer_full.pt"
    if state.get("fsdp"):  # each rank held a dim-0 slice of every tensor
        full = merge_fsdp_shards(shards)
    elif state.get("sharded_optimizer"):  # ZeRO-1: each rank held whole parameters
        full = merge_shards(shards)
    else:
        full = shards[0]
    with atomic_path(out) as tmp:
        torch.save(full, tmp)
    return str(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    print("wrote", consolidate(parser.parse_args(argv).checkpoint))


if __name__ == "__main__":
    run_cli(main)
