"""Memory and step time of LoRA vs full fine-tuning, same model, same batch, one alternating run.

    python bench/lora.py                                  # CPU: a 26M-parameter LM, batch 4 x 256
    python bench/lora.py --device cuda --dim 1024 --layers 12 --rounds 20

A step is forward + backward + AdamW step. Variants run round-robin so that load from other
programs falls on all of them alike; times are medians over the rounds after warm-up.
Memory is counted, not sampled (tracemalloc does not see torch's allocator): parameters +
gradients of the trainable ones + AdamW state + the tensors autograd saves for backward
(through saved_tensors_hooks, each storage once, parameters excluded). On CUDA the measured
torch.cuda.max_memory_allocated of a step is printed beside it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minivlm.lora import apply_lora  # noqa: E402
from minivlm.models.transformer import Transformer, TransformerConfig  # noqa: E402
from minivlm.train.trainable import count_parameters  # noqa: E402


@dataclass
class BenchConfig:
    vocab_size: int = 8192
    dim: int = 512  # with 6 layers and hidden 1408: 25.8M parameters
    layers: int = 6
    heads: int = 8
    kv_heads: int = 4
    hidden_dim: int = 1408
    seq_len: int = 256
    batch: int = 4
    rank: int = 8
    alpha: float = 16.0
    rounds: int = 6
    warmup: int = 2
    device: str = "cpu"


VARIANTS = {  # name -> LoRA targets (None = full fine-tuning)
    "full fine-tuning": None,
    "LoRA q,k,v,o": ("attn",),
    "LoRA all-linear": ("all-linear",),
}


def loss_of(model, ids):
    logits = model(ids[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def saved_activation_bytes(model, ids) -> int:
    """Bytes autograd keeps from forward to backward, each storage counted once."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:  # weights are counted as parameters
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model, ids)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def step(model, optimizer, ids) -> None:
    loss_of(model, ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(BenchConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    config = BenchConfig(**vars(parser.parse_args()))
    device = torch.device(config.device)

    torch.manual_seed(0)
    base = Transformer(TransformerConfig(
        vocab_size=config.vocab_size, dim=config.dim, num_layers=config.layers,
        num_heads=config.heads, num_kv_heads=config.kv_heads, hidden_dim=config.hidden_dim,
        max_seq_len=config.seq_len)).to(device)
    ids = torch.randint(0, config.vocab_size, (config.batch, config.seq_len + 1), device=device)

    runs = {}
    for name, targets in VARIANTS.items():
        model = copy.deepcopy(base).train()
        if targets is not None:
            apply_lora(model, r=config.rank, alpha=config.alpha, targets=targets)
        trainable = [p for p in model.parameters() if p.requires_grad]
        runs[name] = dict(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4), times=[])
    del base

    # Round-robin timing: round r runs every variant once.
    for round_index in range(config.warmup + config.rounds):
        for run in runs.values():
            synchronize(device)
            start = time.perf_counter()
            step(run["model"], run["optimizer"], ids)
            synchronize(device)
            if round_index >= config.warmup:
                run["times"].append(time.perf_counter() - start)

    # Memory, once AdamW has allocated its state.
    for run in runs.values():
        model, optimizer = run["model"], run["optimizer"]
        trainable, total = count_parameters(model)
        bytes_per = next(model.parameters()).element_size()
        run["trainable"], run["count"] = trainable, total
        run["params"] = total * bytes_per
        run["grads"] = trainable * bytes_per
        run["adam"] = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
        run["activations"] = saved_activation_bytes(model, ids)
        run["total"] = run["params"] + run["grads"] + run["adam"] + run["activations"]
        if device.type == "cuda":  # the allocator's own peak over one step (all models resident)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step(model, optimizer, ids)
            run["cuda_peak"] = torch.cuda.max_memory_allocated(device) - before

    full = runs["full fine-tuning"]
    mb = 2 ** 20
    print(f"{full['count'] / 1e6:.1f}M parameters, batch {config.batch} x {config.seq_len}, "
          f"LoRA r={config.rank} alpha={config.alpha}, {device}, "
          f"{torch.get_num_threads()} threads, median of {config.rounds} alternated rounds")
    header = (f"{'':18s} {'trainable':>10s} {'params MB':>9s} {'grads MB':>8s} "
              f"{'AdamW MB':>8s} {'saved act MB':>12s} {'total MB':>8s} {'x full':>6s} "
              f"{'step ms':>8s} {'x full':>6s}")
    if device.type == "cuda":
        header += f" {'CUDA peak-over-resident MB':>26s}"
    print(header)
    full_ms = statistics.median(full["times"]) * 1e3
    for name, run in runs.items():
        ms = statistics.median(run["times"]) * 1e3
        line = (f"{name:18s} {run['trainable']:10,d} {run['params'] / mb:9.1f} "
                f"{run['grads'] / mb:8.1f} {run['adam'] / mb:8.1f} {run['activations'] / mb:12.1f} "
                f"{run['total'] / mb:8.1f} {run['total'] / full['total']:6.2f} {ms:8.1f} "
                f"{ms / full_ms:6.2f}")
        if device.type == "cuda":
            line += f" {run['cuda_peak'] / mb:26.1f}"
        print(line)


if __name__ == "__main__":
    main()
