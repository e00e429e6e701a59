"""Checkpoints: one complete directory per save, and a `latest` pointer that always names one.

    out_dir/
      step_000500/  config.json  model.safetensors  tokenizer/  trainer_state.json
                    optimizer_rank0.pt [optimizer_rank1.pt ...]  rng_rank0.pt [...]
      latest        -> the text "step_000500"
A save is written into `.tmp_step_000500/`; once every rank has finished its files (a barrier
under DDP) `install` renames it into place, then moves `latest` (a temp file, os.replace). When a
directory of the same name is already there (a rerun with --overwrite), `latest` is pointed at a
complete copy before each rename, so a kill -9 at any instant leaves `latest` naming a complete
checkpoint, sometimes a hidden one; the next save finishes the interrupted one first. A fresh run
into a directory that holds checkpoints is refused unless it says --resume or --overwrite.
Tensors are read back with safetensors or torch.load(weights_only=True): a checkpoint can never
run code on load, and a file it cannot read is a CheckpointError naming it. Under FSDP the full
weights are gathered into model.safetensors (loadable in one process) while each rank saves its
own optimizer shard (train/fsdp.py; `python -m minivlm.consolidate` merges them).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model

from minivlm.errors import CheckpointError
from minivlm.files import write_text_atomic
from minivlm.train.distributed import DistributedEnv, barrier
from minivlm.train.fsdp import (full_state_dict, is_fsdp, load_fsdp_optimizer_state,
                                load_fsdp_weights, local_optimizer_state)
from minivlm.weights.checkpoint import (LATEST, RUN_CONFIG_FILE, TOKENIZER_DIR, TRAINER_STATE_FILE,
                                         WEIGHTS_FILE, load_weights)

HIDDEN = (".tmp_", ".old_")  # a save being written / a step directory being replaced


def check_out_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """A fresh run must not silently mix its checkpoints with an earlier run's."""
    if resume and overwrite:
        raise ValueError("pass --resume (continue) or --overwrite (start over), not both")
    out_dir = Path(out_dir)
    if resume or overwrite or not out_dir.is_dir():
        return
    steps = sorted(d.name for d in out_dir.glob("step_*"))
    if (out_dir / LATEST).is_file() or steps:
        latest = ((out_dir / LATEST).read_text().strip() if (out_dir / LATEST).is_file()
                  else steps[-1])
        raise ValueError(f"{out_dir} already holds checkpoints (latest: {latest}): pass --resume "
                         "to continue or --overwrite to start over")


def save_checkpoint(out_dir: str | Path, step: int, *, model, config: dict, tokenizer,
                    trainer_state: dict, optimizer, env: DistributedEnv, keep: int = 0,
                    sharded_optimizer: bool = False) -> Path:
    out_dir = Path(out_dir)
    name = f"step_{step:06d}"
    tmp = out_dir / f".tmp_{name}"
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        finish_interrupted_save(out_dir)  # afterwards `latest` names no hidden directory
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(env)
    fsdp = is_fsdp(model)
    # FSDP: the whole weights are gathered (a collective, on every rank) for rank 0 to write.
    weights = full_state_dict(model) if fsdp else None
    # ZeRO-1 and FSDP: every rank owns a different shard of the optimizer state, so every rank
    # writes.
    if sharded_optimizer or env.is_main:
        torch.save(local_optimizer_state(optimizer) if fsdp else optimizer.state_dict(),
                   tmp / f"optimizer_rank{env.rank}.pt")
    torch.save(rng_state(), tmp / f"rng_rank{env.rank}.pt")
    if env.is_main:
        if fsdp:
            save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            save_model(model, str(tmp / WEIGHTS_FILE))  # drops tied duplicates itself
        (tmp / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        tokenizer.save(tmp / TOKENIZER_DIR)
        state = dict(trainer_state, step=step, world_size=env.world_size,
                     sharded_optimizer=sharded_optimizer, fsdp=fsdp)
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
    barrier(env)  # every shard is on disk before the directory becomes visible
    if env.is_main:
        install(out_dir, name)
        prune(out_dir, keep, just_saved=name)
    barrier(env)
    return out_dir / name


def install(out_dir: Path, name: str) -> None:
    """Move the complete `.tmp_<name>` into place as `<name>` and point `latest` at it. A kill may
    land between any two lines: before each rename `latest` names a directory the rename does not
    touch, and running this again finishes the job from wherever it stopped."""
    final, tmp, old = out_dir / name, out_dir / f".tmp_{name}", out_dir / f".old_{name}"
    if tmp.is_dir() and final.is_dir():  # replacing a save of the same step
        write_text_atomic(out_dir / LATEST, tmp.name)
        shutil.rmtree(old, ignore_errors=True)  # a copy a killed run did not finish removing
        os.replace(final, old)
    if tmp.is_dir():
        if old.is_dir():
            write_text_atomic(out_dir / LATEST, old.name)
        os.replace(tmp, final)
    write_text_atomic(out_dir / LATEST, name)
    shutil.rmtree(old, ignore_errors=True)


def finish_interrupted_save(out_dir: Path) -> None:
    """If a killed save left `latest` naming a hidden copy, finish that save; then remove what
    killed saves left behind (half-written `.tmp_*`, unremoved `.old_*`)."""
    target = (out_dir / LATEST).read_text().strip() if (out_dir / LATEST).is_file() else ""
    for prefix in HIDDEN:
        name = target[len(prefix):]
        if target.startswith(prefix) and ((out_dir / f".tmp_{name}").is_dir()
                                          or (out_dir / name).is_dir()):
            install(out_dir, name)
            target = name
    for prefix in HIDDEN:
        for leftover in out_dir.glob(f"{prefix}step_*"):
            if leftover.name != target:  # never the directory `latest` names
                shutil.rmtree(leftover, ignore_errors=True)


def prune(out_dir: Path, keep: int, just_saved: str) -> None:
    """Keep `keep` step directories (0 keeps all): the one just saved and the highest others.
    The new one is never pruned, even if an older run left higher step numbers behind."""
    if keep <= 0:
        return
    others = [d for d in sorted(out_dir.glob("step_*")) if d.name != just_saved]
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_tensor_file(path: Path):
    """torch.load(weights_only=True) of one checkpoint file; damage is one CheckpointError line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # What torch raises for a truncated file: EOFError (empty), RuntimeError (zip archive cut
    # short), UnpicklingError (a damaged pickle), OSError (a cut inside a tensor record).
    except (EOFError, RuntimeError, pickle.UnpicklingError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        detail = " ".join(str(error).split(". ")[0].split()) or type(error).__name__
        raise CheckpointError(f"{path}: cannot read ({detail}); the file is truncated or "
                              "damaged, resume from an earlier step directory") from None


def read_trainer_state(ckpt_dir: Path) -> dict:
    path = ckpt_dir / TRAINER_STATE_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}); "
                              "the file is truncated or damaged") from None


def load_optimizer_state(ckpt_dir: Path, env: DistributedEnv, zero1: bool,
                         fsdp: bool = False) -> tuple[dict, bool]:
    """(state dict, is_this_ranks_shard). A ZeRO-1 or FSDP run on the same world size, sharded the
    same way, takes its own shard; anything else needs a full state dict (a plain optimizer's, or
    consolidated shards)."""
    state = read_trainer_state(ckpt_dir)
    saved = "--fsdp" if state.get("fsdp") else "--zero1" if state["sharded_optimizer"] else ""
    requested = "--fsdp" if fsdp else "--zero1" if zero1 else ""
    if state["sharded_optimizer"] and saved == requested and state["world_size"] == env.world_size:
        path = ckpt_dir / f"optimizer_rank{env.rank}.pt"
        if not path.is_file():
            raise ValueError(f"{ckpt_dir}: optimizer shard {path.name} is missing; the checkpoint "
                             "is incomplete, resume from an earlier step directory")
        return load_tensor_file(path), True
    path = ckpt_dir / "optimizer_full.pt"
    if not path.is_file() and not state["sharded_optimizer"]:
        path = ckpt_dir / "optimizer_rank0.pt"
    if not path.is_file():
        raise ValueError(
            f"{ckpt_dir}: the optimizer state is sharded over {state['world_size']} ranks "
            f"({saved}), this run has {env.world_size} ({requested or 'unsharded'}); run "
            f"`python -m minivlm.consolidate {ckpt_dir}` first to write a full optimizer state "
            "that any world size can resume from")
    return load_tensor_file(path), False


def load_model_and_optimizer(ckpt_dir: Path, model, optimizer, env: DistributedEnv, *,
                             zero1: bool, fsdp: bool) -> None:
    """Weights and optimizer state into this run's layout (plain, ZeRO-1 or FSDP); a full
    optimizer state is re-sharded for this world size."""
    if fsdp:
        load_fsdp_weights(model, ckpt_dir / WEIGHTS_FILE)
    else:
        load_weights(model, ckpt_dir / WEIGHTS_FILE)
    state, is_shard = load_optimizer_state(ckpt_dir, env, zero1, fsdp)
    if fsdp:
        load_fsdp_optimizer_state(optimizer, state, is_shard)
    elif zero1 and not is_shard:
        optimizer.load_full_state_dict(state)
    else:
        optimizer.load_state_dict(state)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(ckpt_dir: Path, env: DistributedEnv) -> None:
    path = ckpt_dir / f"rng_rank{env.rank}.pt"
    if not path.is_file():
        path = ckpt_dir / "rng_rank0.pt"
    state = load_tensor_file(path)
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
