"""Which examples each optimizer step sees, on each rank: a pure function of (seed, epoch).

DistributedSampler deals every rank a disjoint share of each epoch; optional grouping by length
keeps padding small. With packing (data/packing.py) the unit dealt is a packed row, a tuple of
example indices planned once (first-fit-decreasing), instead of one example. Because the order
depends on nothing else, a resumed run that starts at micro-batch m gets exactly the batches the
uninterrupted run had from m on.
"""
from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler

from minivlm.data.packing import first_fit_decreasing
from minivlm.train.distributed import DistributedEnv


class BatchPlan:
    """This rank's micro-batches, epoch after epoch: DistributedSampler order (set_epoch), then
    optionally grouped by length so padding is small. Micro-batch m is always the same indices.
    `pack_len` > 0: each micro-batch is `batch_size` packed rows of up to pack_len tokens."""

    def __init__(self, lengths: list[int], batch_size: int, env: DistributedEnv, seed: int,
                 group_by_length: bool, pack_len: int = 0, names: list[str] | None = None):
        self.batch_size, self.group = batch_size, group_by_length
        if pack_len:  # the same rows every epoch, dealt in a new order
            self.units: list = first_fit_decreasing(lengths, pack_len, names)
            self.lengths = [sum(lengths[i] for i in row) for row in self.units]
        else:
            self.units, self.lengths = list(range(len(lengths))), lengths
        self.sampler = DistributedSampler(range(len(self.units)), num_replicas=env.world_size,
                                          rank=env.rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            what = f"packed rows (from {len(lengths)} examples)" if pack_len else "examples"
            raise ValueError(f"{len(self.units)} {what} are fewer than one batch of {batch_size} "
                             f"per each of {env.world_size} processes")

    def epoch_batches(self, epoch: int) -> list[list]:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)[: self.per_epoch * self.batch_size]
        if self.group:  # sort inside windows of 32 batches: similar lengths share a batch
            window = 32 * self.batch_size
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s:s + window], key=self.lengths.__getitem__)]
        batches = [[self.units[i] for i in order[s:s + self.batch_size]]
                   for s in range(0, len(order), self.batch_size)]
        if self.group:  # shuffle the batches back, deterministically
            g = torch.Generator().manual_seed(epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def from_micro_step(self, start: int):
        epoch, offset = divmod(start, self.per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0
