"""Which examples each optimizer step sees, on each rank: a pure function of (seed, epoch).

DistributedSampler deals every rank a disjoint share of each epoch; optional grouping by length
keeps padding small. Because the order depends on nothing else, a resumed run that starts at
micro-batch m gets exactly the batches the uninterrupted run had from m on.
"""
from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler

from minivlm.train.distributed import DistributedEnv


class BatchPlan:
    """This rank's micro-batches, epoch after epoch: DistributedSampler order (set_epoch), then
    optionally grouped by length so padding is small. Micro-batch m is always the same indices."""

    def __init__(self, lengths: list[int], batch_size: int, env: DistributedEnv, seed: int,
                 group_by_length: bool):
        self.lengths, self.batch_size, self.group = lengths, batch_size, group_by_length
        self.sampler = DistributedSampler(range(len(lengths)), num_replicas=env.world_size,
                                          rank=env.rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(lengths)} examples are fewer than one batch of {batch_size} "
                             f"per each of {env.world_size} processes")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)[: self.per_epoch * self.batch_size]
        if self.group:  # sort inside windows of 32 batches: similar lengths share a batch
            window = 32 * self.batch_size
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s:s + window], key=self.lengths.__getitem__)]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group:  # shuffle the batches back, deterministically
            g = torch.Generator().manual_seed(epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def from_micro_step(self, start: int):
        epoch, offset = divmod(start, self.per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0
