"""One rank of the 2-process gloo run behind tests/test_zero.py.

tests/test_zero.py starts two of these with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): `python tests/_zero_worker.py OUT_DIR`. Each rank writes what it
saw to OUT_DIR/rank{R}.pt; the test compares those with single-process runs. The model, data,
schedule and training loop here are shared with the single-process references in the test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from minivlm.train.distributed import (all_reduce_mean, barrier, cleanup, init_distributed,
                                       no_sync_if, wrap_ddp)
from minivlm.train.zero import ZeRO1, clip_grad_norm_, optimizer_state_bytes

STEPS = 5
RESUME_AT = 3  # checkpoints are taken after this many steps
GLOBAL_BATCH = 8
BASE_LR = (1e-2, 3e-2)  # decay group, no-decay group
MAX_NORM = 0.05  # below the gradient norms of this model, so clipping is active


def build_model(seed: int = 0) -> nn.Module:
    # Layers of different sizes so the two shards are uneven (1152 vs 1088 elements at N=2).
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 24), nn.LayerNorm(24),
                         nn.Tanh(), nn.Linear(24, 8))


def param_groups(model: nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "lr": BASE_LR[0], "weight_decay": 0.1},
        {"params": no_decay, "lr": BASE_LR[1], "weight_decay": 0.0},
    ]


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return (torch.randn(GLOBAL_BATCH, 16, generator=generator),
            torch.randn(GLOBAL_BATCH, 8, generator=generator))


def train(model, optimizer, steps, *, rank=0, world_size=1, clip=None, accumulation=1):
    """Train on this rank's slice of each global batch; returns (local losses, grad norms)."""
    losses, norms = [], []
    for step in steps:
        x, y = global_batch(step)
        per_rank = GLOBAL_BATCH // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        x, y = x[mine], y[mine]
        # A schedule that changes lr every step: it must reach the ZeRO1 shard's groups.
        for group, base_lr in zip(optimizer.param_groups, BASE_LR):
            group["lr"] = base_lr * (step + 1) / STEPS
        micro = per_rank // accumulation
        step_loss = torch.zeros(())
        for m in range(accumulation):
            with no_sync_if(model, m < accumulation - 1):
                chunk = slice(m * micro, (m + 1) * micro)
                loss = F.mse_loss(model(x[chunk]), y[chunk]) / accumulation
                loss.backward()
            step_loss += loss.detach()
        if clip is not None:
            norms.append(clip().detach().clone())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return losses, norms


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    env = init_distributed(ddp=True, device_hint="cpu")
    rank, world_size = env.rank, env.world_size
    result = {}

    result["mean_float"] = all_reduce_mean(float(rank), env)
    result["mean_tensor"] = all_reduce_mean(torch.tensor([rank, 2.0 * rank]), env)

    def new_run(optimizer_class=ZeRO1, params=None):
        model = build_model()
        if params is not None:
            with torch.no_grad():
                for p, saved in zip(model.parameters(), params):
                    p.copy_(saved)
        model = wrap_ddp(model, env)
        return model, optimizer_class(param_groups(model), optimizer_class=torch.optim.AdamW)

    def finish(model, losses, norms=()):
        return {
            "params": snapshot(model),
            "losses": [all_reduce_mean(loss, env) for loss in losses],
            "norms": list(norms),
        }

    # 1. ZeRO1 uninterrupted, checkpointed (sharded and consolidated) after RESUME_AT steps.
    model, zero = new_run()
    result["numel_per_rank"] = [sum(p.numel() for group in shard for p in group)
                                for shard in zero.params_per_rank]
    losses, _ = train(model, zero, range(RESUME_AT), rank=rank, world_size=world_size)
    torch.save({"params": snapshot(model), "shard": zero.state_dict()},
               out_dir / f"shard{rank}.pt")
    full = zero.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save(full, out_dir / "full.pt")
    more_losses, _ = train(model, zero, range(RESUME_AT, STEPS), rank=rank, world_size=world_size)
    result["zero1"] = finish(model, losses + more_losses)
    result["state_bytes"] = optimizer_state_bytes(zero)
    barrier(env)  # both shard files and full.pt are written

    # 2. The same with torch's ZeroRedundancyOptimizer.
    model, torch_zero = new_run(ZeroRedundancyOptimizer)
    result["torch_zero"] = finish(model, train(model, torch_zero, range(STEPS), rank=rank,
                                               world_size=world_size)[0])
    result["torch_state_bytes"] = optimizer_state_bytes(torch_zero)

    # 3. Resume from this rank's shard file; 4. from the consolidated file via load_full_state_dict.
    saved = torch.load(out_dir / f"shard{rank}.pt")
    model, zero = new_run(params=saved["params"])
    zero.load_state_dict(saved["shard"])
    result["resumed_shard"] = finish(model, train(model, zero, range(RESUME_AT, STEPS), rank=rank,
                                                  world_size=world_size)[0])
    model, zero = new_run(params=saved["params"])
    zero.load_full_state_dict(torch.load(out_dir / "full.pt"))
    result["resumed_full"] = finish(model, train(model, zero, range(RESUME_AT, STEPS), rank=rank,
                                                 world_size=world_size)[0])
    try:  # the other rank's shard must be refused
        zero.load_state_dict(torch.load(out_dir / f"shard{1 - rank}.pt")["shard"])
        result["wrong_shard_error"] = None
    except ValueError as error:
        result["wrong_shard_error"] = str(error)

    # 5. Global-norm clipping on DDP's full gradients (every rank holds all of them).
    model, zero = new_run()
    clip = lambda: clip_grad_norm_(model.parameters(), MAX_NORM)  # noqa: E731
    result["clip_full"] = finish(model, *train(model, zero, range(STEPS), rank=rank,
                                               world_size=world_size, clip=clip))

    # 6. Gradient accumulation over 2 micro-batches, the first under no_sync.
    model, zero = new_run()
    result["accumulated"] = finish(
        model, train(model, zero, range(STEPS), rank=rank, world_size=world_size, accumulation=2)[0]
    )

    # 7. no_sync_if really skips the all-reduce: gradients differ across ranks until a synced
    # backward.
    model, _ = new_run()
    x, y = global_batch(0)
    x, y = x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]
    with no_sync_if(model, True):
        F.mse_loss(model(x), y).backward()
    result["grad_unsynced"] = model.module[0].weight.grad.clone()
    with no_sync_if(model, False):
        F.mse_loss(model(x), y).backward()
    result["grad_synced"] = model.module[0].weight.grad.clone()

    torch.save(result, out_dir / f"rank{rank}.pt")
    cleanup(env)  # waits for the other rank (a barrier) before tearing the group down


if __name__ == "__main__":
    main(Path(sys.argv[1]))
