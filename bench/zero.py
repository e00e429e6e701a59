"""Bytes and step time per rank: DDP + AdamW, torch's ZeRO, our ZeRO1, and FSDP (ZeRO-3).

    python bench/zero.py                      # spawns 2 gloo ranks on the CPU
    python bench/zero.py --world_size 4 --dim 1024 --layers 12

All optimizers run in the same processes on identical models, alternated round by round so that
load from other programs falls on all of them alike. Step time is the optimizer step alone
(the part ZeRO changes: a 1/N shard update plus the parameter broadcast); iteration time adds
forward, backward and DDP's gradient all-reduce. Figures are medians over rounds of the slowest
rank. The goal is ZeRO1 / torch ZeRO step time <= 1.1 (DESIGN.md).

Bytes are measured, per rank, after a backward: the parameters, gradients and optimizer state
this rank holds (for FSDP the DTensors' local shards). FSDP also holds, while a layer runs, that
layer's gathered parameters (one 1024x1024 layer here), which this count leaves out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minivlm.train.distributed import barrier, cleanup, init_distributed, wrap_ddp  # noqa: E402
from minivlm.train.zero import ZeRO1  # noqa: E402


@dataclass
class BenchConfig:
    world_size: int = 2
    dim: int = 1024  # 12 layers of 1024x1024 (+ bias): 12.6M parameters
    layers: int = 12
    batch: int = 16  # per rank
    rounds: int = 7
    steps_per_round: int = 3
    threads_per_rank: int = 1  # a 2-core machine: one thread per rank


OPTIMIZERS = {
    "DDP + AdamW": lambda params: torch.optim.AdamW(params, lr=1e-4),
    "DDP + torch ZeRO": lambda params: ZeroRedundancyOptimizer(params, torch.optim.AdamW, lr=1e-4),
    "DDP + torch ZeRO (bucket view)": lambda params: ZeroRedundancyOptimizer(
        params, torch.optim.AdamW, parameters_as_bucket_view=True, lr=1e-4
    ),
    "DDP + ZeRO1 (ours)": lambda params: ZeRO1(params, torch.optim.AdamW, lr=1e-4),
}


def build_model(config: BenchConfig) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(config.layers):
        layers += [nn.Linear(config.dim, config.dim), nn.ReLU()]
    return nn.Sequential(*layers)


def build_fsdp_model(config: BenchConfig, env) -> nn.Module:
    """The same model with every Linear a FSDP unit (as each decoder layer in fsdp.py)."""
    model = build_model(config)
    mesh = init_device_mesh("cpu", (env.world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def local_bytes(tensors) -> int:
    """Bytes this rank holds: a DTensor counts its local shard only."""
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def rank_bytes(model: nn.Module, optimizer) -> list[int]:
    """[parameters, gradients, optimizer state] bytes on this rank."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeRO1 and torch's keep the shard's at .optim
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    params = list(model.parameters())
    return [local_bytes(params), local_bytes(p.grad for p in params), local_bytes(state)]


def timed(fn, env) -> float:
    """Seconds for fn on the slowest rank (ranks start together)."""
    barrier(env)
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def run_rank(rank: int, config: BenchConfig, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(config.world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(config.threads_per_rank)
    env = init_distributed(ddp=True, device_hint="cpu")
    runs = {}
    for name, make_optimizer in OPTIMIZERS.items():
        model = wrap_ddp(build_model(config), env)
        runs[name] = (model, make_optimizer(model.parameters()))
    model = build_fsdp_model(config, env)
    runs["FSDP + AdamW"] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(config.batch, config.dim, generator=generator)
    y = torch.randn(config.batch, config.dim, generator=generator)

    step_times = {name: [] for name in runs}
    iteration_times = {name: [] for name in runs}
    for round_index in range(config.rounds + 1):  # round 0 warms up (allocates the AdamW state)
        for name, (model, optimizer) in runs.items():
            steps, iterations = [], []
            for _ in range(config.steps_per_round):
                backward = timed(lambda: F.mse_loss(model(x), y).backward(), env)
                steps.append(timed(optimizer.step, env))
                iterations.append(backward + steps[-1])
                optimizer.zero_grad(set_to_none=True)
            if round_index > 0:
                step_times[name].append(statistics.median(steps))
                iteration_times[name].append(statistics.median(iterations))

    for model, _ in runs.values():  # gradients present, as during the optimizer step
        F.mse_loss(model(x), y).backward()
    state_bytes = torch.tensor([rank_bytes(model, opt) for model, opt in runs.values()],
                               dtype=torch.float64)  # (runs, 3)
    all_state_bytes = [torch.zeros_like(state_bytes) for _ in range(env.world_size)]
    dist.all_gather(all_state_bytes, state_bytes)
    if env.is_main:
        params = sum(p.numel() for p in build_model(config).parameters())
        print(f"{params / 1e6:.1f}M parameters, {env.world_size} ranks (gloo, CPU), "
              f"{config.rounds} rounds x {config.steps_per_round} steps, "
              "medians of the slowest rank")
        print(f"MB per rank (the largest rank's), Ψ = {params / 1e6:.1f}M parameters "
              f"= {4 * params / 2**20:.1f} MB in fp32")
        print(f"{'':32s} {'params':>7s} {'grads':>7s} {'state':>7s} {'total':>7s} {'x Ψ':>5s} "
              f"{'step ms':>8s} {'iteration ms':>13s}")
        for i, name in enumerate(runs):
            mb = [max(b[i][k].item() for b in all_state_bytes) / 2**20 for k in range(3)]
            step_ms = statistics.median(step_times[name]) * 1e3
            iteration_ms = statistics.median(iteration_times[name]) * 1e3
            per_param = sum(mb) * 2**20 / params
            print(f"{name:32s} {mb[0]:7.1f} {mb[1]:7.1f} {mb[2]:7.1f} {sum(mb):7.1f} "
                  f"{per_param:5.1f} {step_ms:8.1f} {iteration_ms:13.1f}")
        ours = statistics.median(step_times["DDP + ZeRO1 (ours)"])
        theirs = statistics.median(step_times["DDP + torch ZeRO"])
        print(f"ZeRO1 / torch ZeRO step time: {ours / theirs:.2f} (goal <= 1.1)")
        fsdp = statistics.median(iteration_times["FSDP + AdamW"])
        ddp = statistics.median(iteration_times["DDP + AdamW"])
        print(f"FSDP / DDP iteration time: {fsdp / ddp:.2f}")
    cleanup(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(BenchConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    config = BenchConfig(**vars(parser.parse_args()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(config, port), nprocs=config.world_size)


if __name__ == "__main__":
    main()
