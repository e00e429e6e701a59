"""Checkpoints: one complete directory per save, and a `latest` pointer that moves last.

    out_dir/
      step_000500/  config.json  model.safetensors  tokenizer/  trainer_state.json
                    optimizer_rank0.pt [optimizer_rank1.pt ...]  rng_rank0.pt [...]
      latest        -> the text "step_000500"
A save is written into `.tmp_step_000500/` and renamed when every rank has finished its files
(a barrier under DDP); only then is `latest` replaced (write a temp file, os.replace). A crash
at any moment leaves the previous checkpoint and pointer intact. Tensors are read back with
safetensors or torch.load(weights_only=True): a checkpoint can never run code on load.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model

from minivlm.files import write_text_atomic
from minivlm.train.distributed import DistributedEnv, barrier
from minivlm.weights.checkpoint import LATEST

def save_checkpoint(out_dir: str | Path, step: int, *, model, config: dict, tokenizer,
                    trainer_state: dict, optimizer, env: DistributedEnv, keep: int = 0,
                    sharded_optimizer: bool = False) -> Path:
    out_dir = Path(out_dir)
    name = f"step_{step:06d}"
    final, tmp = out_dir / name, out_dir / f".tmp_{name}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    # ZeRO-1: every rank owns a different shard of the optimizer state, so every rank writes.
    if sharded_optimizer or env.is_main:
        torch.save(optimizer.state_dict(), tmp / f"optimizer_rank{env.rank}.pt")
    torch.save(rng_state(), tmp / f"rng_rank{env.rank}.pt")
    if env.is_main:
        save_model(model, str(tmp / "model.safetensors"))  # drops tied duplicates itself
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(tmp / "tokenizer")
        state = dict(trainer_state, step=step, world_size=env.world_size,
                     sharded_optimizer=sharded_optimizer)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    barrier(env)  # every shard is on disk before the directory becomes visible
    if env.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(out_dir / LATEST, name)
        prune(out_dir, keep, just_saved=name)
    barrier(env)
    return final


def prune(out_dir: Path, keep: int, just_saved: str) -> None:
    """Keep `keep` step directories (0 keeps all): the one just saved and the highest others.
    The new one is never pruned, even if an older run left higher step numbers behind."""
    if keep <= 0:
        return
    others = [d for d in sorted(out_dir.glob("step_*")) if d.name != just_saved]
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_optimizer_state(ckpt_dir: Path, env: DistributedEnv, zero1: bool) -> tuple[dict, bool]:
    """(state dict, is_this_ranks_shard). A ZeRO-1 run on the same world size takes its own shard;
    anything else needs a full state dict (a plain optimizer's, or consolidated shards)."""
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    if state["sharded_optimizer"] and zero1 and state["world_size"] == env.world_size:
        path = ckpt_dir / f"optimizer_rank{env.rank}.pt"
        if not path.is_file():
            raise ValueError(f"{ckpt_dir}: optimizer shard {path.name} is missing; the checkpoint "
                             "is incomplete, resume from an earlier step directory")
        return torch.load(path, map_location="cpu", weights_only=True), True
    path = ckpt_dir / "optimizer_full.pt"
    if not path.is_file() and not state["sharded_optimizer"]:
        path = ckpt_dir / "optimizer_rank0.pt"
    if not path.is_file():
        raise ValueError(
            f"{ckpt_dir}: optimizer sharded over {state['world_size']} ranks, this run has "
            f"{env.world_size}{' with --zero1' if zero1 else ' without --zero1'}; run "
            f"`python -m minivlm.consolidate {ckpt_dir}` first to write a full optimizer state "
            "that any world size can resume from")
    return torch.load(path, map_location="cpu", weights_only=True), False


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(ckpt_dir: Path, env: DistributedEnv) -> None:
    path = ckpt_dir / f"rng_rank{env.rank}.pt"
    if not path.is_file():
        path = ckpt_dir / "rng_rank0.pt"
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def config_differences(saved: dict, requested: dict, prefix: str = "") -> list[str]:
    """Fields whose values differ between two nested config dicts, as 'a.b: saved -> requested'."""
    out = []
    for key in sorted(set(saved) | set(requested)):
        a, b = saved.get(key), requested.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} requested")
    return out
