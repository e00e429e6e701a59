"""Data-parallel plumbing: process group setup, DDP wrapping and small collectives.

Launch N processes with `torchrun --nproc_per_node N script.py --ddp`; torchrun sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each. NCCL is used on CUDA, gloo on
CPU. With world size 1 every helper here is a no-op, so a script has one code path.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minivlm.devices import resolve_device

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(ddp: bool, device_hint: str | torch.device | None = None) -> DistributedEnv:
    """Join torchrun's process group (ddp=True) or describe a single process (ddp=False).

    device_hint picks the device type ("cuda", "cpu", ...); None or "auto" means CUDA when
    available (minivlm/devices.py). Under DDP on CUDA each process takes the GPU of its LOCAL_RANK.
    """
    device = resolve_device(device_hint)
    if not ddp:
        return DistributedEnv(rank=0, local_rank=0, world_size=1, device=device)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(  # a launch mistake, reported as one line by the scripts
            f"--ddp needs torchrun's environment ({', '.join(missing)} not set): "
            "launch with `torchrun --nproc_per_node N script.py --ddp`"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # NCCL and *_object collectives use the current device
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return DistributedEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup(env: DistributedEnv) -> None:
    if dist.is_initialized():
        # Every rank arrives before any tears down: destroying the group while a peer still
        # talks to it aborts that peer ("terminate called without an active exception").
        barrier(env)
        dist.destroy_process_group()


def barrier(env: DistributedEnv) -> None:
    if env.distributed:
        # NCCL wants to know the GPU, or it guesses one and warns.
        dist.barrier(device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def all_reduce_mean(value: float | torch.Tensor, env: DistributedEnv) -> float | torch.Tensor:
    """The mean over ranks of a number or tensor (e.g. a loss for logging), as the same kind."""
    if not env.distributed:
        return value
    if torch.is_tensor(value):
        total = value.detach().to(env.device, copy=True)
        dist.all_reduce(total)
        return (total / env.world_size).to(value.device)
    total = torch.tensor(float(value), dtype=torch.float64, device=env.device)
    dist.all_reduce(total)
    return total.item() / env.world_size


def broadcast_int(value: int, env: DistributedEnv) -> int:
    """Rank 0's `value` on every rank (a decision only one rank may make, such as the step count
    a time budget fixes from rank 0's clock)."""
    if not env.distributed:
        return value
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=env.device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def wrap_ddp(model: nn.Module, env: DistributedEnv,
             find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around the model (which must already be on env.device).

    find_unused_parameters=True is needed when some trainable parameters get no gradient in a
    step (e.g. a mask decoder on a batch without [SEG]); it costs an extra graph traversal.
    """
    if not env.distributed:
        return model
    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=find_unused_parameters)


def no_sync_if(model: nn.Module, condition: bool) -> contextlib.AbstractContextManager:
    """model.no_sync() when condition holds, else nothing.

    With gradient accumulation only the last micro-step's backward needs DDP's all-reduce: the
    earlier ones just add to the local .grad, and the final all-reduce averages the sums. Skipping
    it saves (accumulation_steps - 1) all-reduces per optimizer step (nanoGPT does the same by
    toggling require_backward_grad_sync).
    """
    if condition and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
