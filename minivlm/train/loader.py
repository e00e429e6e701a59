"""The DataLoader a stage trains from: how many workers decode images, and how batches reach the
device.

    --num-workers auto   CPU: 0. The step's matmuls already use every core and a worker's
                         decoding competes with them. On this project's 2-core CPU the demo's
                         steps/s with 0 or 1 worker were the same within the machine's noise
                         (SFT 4.5-6.0, pretrain 11.9-13.1, lazy or preloaded alike), and a
                         worker's batch costs the main process more to receive than it costs to
                         make (bench/data.py, lazy items: the main process alone 2,700-5,400
                         samples/s, 1 worker 1,100-1,500, 2 workers 2,000-2,300; the demo's step
                         consumes 90-100).
                         CUDA: one worker per core this rank has, less one for the training
                         loop, up to 8 (LLaVA's training scripts pass 4); batches
                         in pinned memory (so that .to(device, non_blocking=True) overlaps),
                         workers kept alive across epochs and 4 batches prefetched each.
An item depends only on its index (ChatDataset: nothing random is drawn while decoding; a bad
image is replaced deterministically, data/late_skips.py), and the order of indices only on (seed,
epoch) (batch_plan.py), so every number of workers trains the same batches and a resumed run
continues bit-exactly. The workers' own seeds come from the trainer's generator, never the
global RNG, which dropout draws from.
A stream of shards (stream_set.py) has no indices: its order is the shards', one reader per
worker, and each batch handed to the training loop marks its samples consumed (the position
--resume continues from). Its workers are not kept alive: shard_stream.py reads each reader's
position when a worker starts.
"""
from __future__ import annotations

import functools
import os

import torch
from torch.utils.data import DataLoader

from minivlm.data.batch import collate
from minivlm.data.packing import PackedRows, collate_packed
from minivlm.train.batch_plan import BatchPlan
from minivlm.train.config import TrainConfig
from minivlm.train.distributed import DistributedEnv
from minivlm.train.stream_set import StreamSet, collate_stream

MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loader_workers(value: str | int, device: torch.device) -> int:
    """--num-workers: a count, or "auto" (see the module docstring)."""
    if str(value) != "auto":
        return int(value)
    if device.type != "cuda":
        return 0
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's, per machine
    return max(1, min(MAX_AUTO_WORKERS, available_cores() // ranks_here - 1))


def tokenize_workers(value: str | int) -> int:
    """--tokenize-workers: a count, or "auto": one per core, up to 8 (data/record_encoder.py)."""
    if str(value) != "auto":
        return int(value)
    cores = available_cores()
    return min(MAX_AUTO_WORKERS, cores) if cores >= 2 else 0


def batch_plan(train_set, config: TrainConfig, env: DistributedEnv,
               max_seq_len: int) -> BatchPlan | None:
    """The order of a dataset's batches (batch_plan.py); None for a stream (its shards' order)."""
    if isinstance(train_set, StreamSet):
        return None
    return BatchPlan(train_set.lengths(), config.batch_size, env, config.seed,
                     config.group_by_length, pack_len=max_seq_len if config.pack else 0,
                     names=train_set.sources() if config.pack else None)


def trainer_batches(train_set, plan: BatchPlan | None, config: TrainConfig,
                    device: torch.device, pad_id: int, micro_step: int):
    """The batches from micro-batch `micro_step` on (0, or where a resumed run stopped)."""
    workers = loader_workers(config.num_workers, device)
    if plan is None:
        return stream_batches(train_set, config.batch_size, pad_id, workers, device,
                              config.seed, micro_step)
    dataset, collate_fn = ((PackedRows(train_set), collate_packed) if config.pack
                           else (train_set, collate))
    return training_loader(dataset, plan.from_micro_step(micro_step),
                           functools.partial(collate_fn, pad_id=pad_id), workers, device,
                           config.seed)


def stream_batches(train_set: StreamSet, batch_size: int, pad_id: int, workers: int,
                   device: torch.device, seed: int, micro_step: int):
    """A stream's batches; each one handed out marks its samples consumed."""
    if workers != train_set.stream.num_workers:
        raise ValueError(f"{train_set.name}: the stream was built for "
                         f"{train_set.stream.num_workers} loader worker(s), the loader has "
                         f"{workers}")
    train_set.stream.first_worker = micro_step % max(workers, 1)  # shard_stream.py says why
    cuda = device.type == "cuda"
    loader = DataLoader(train_set, batch_size=batch_size, num_workers=workers, pin_memory=cuda,
                        collate_fn=functools.partial(collate_stream, pad_id=pad_id),
                        persistent_workers=False, prefetch_factor=(4 if cuda else 2) if workers
                        else None, generator=torch.Generator().manual_seed(seed))
    for batch in _one_line_errors(iter(loader)):
        train_set.stream.mark_consumed(batch.pop("stream_positions"))
        yield batch


def training_loader(dataset, batch_sampler, collate_fn, workers: int, device: torch.device,
                    seed: int):
    """An iterator over the batches; a worker's ValueError (a bad record) arrives as the one-line
    error it was, not as the DataLoader's multi-line report."""
    cuda = device.type == "cuda"
    extra = dict(persistent_workers=True, prefetch_factor=4 if cuda else 2) if workers else {}
    loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn,
                        num_workers=workers, pin_memory=cuda,
                        # its own generator: creating the iterator must not draw from the global
                        # RNG, or a resumed run's dropout masks would differ
                        generator=torch.Generator().manual_seed(seed), **extra)
    return _one_line_errors(iter(loader))


def _one_line_errors(batches):
    try:
        yield from batches
    except ValueError as error:
        lines = str(error).strip().splitlines()
        if len(lines) > 1 and "in DataLoader worker process" in lines[0]:
            # "Caught ValueError in DataLoader worker process 0.\n...\nValueError: file:3: ..."
            raise ValueError(lines[-1].split(": ", 1)[-1]) from None
        raise
