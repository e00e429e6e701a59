"""A hybrid dataset drawn from several datasets in fixed proportions (LISA's --sample_rates).

LISA trains segmentation with `--dataset sem_seg||refer_seg||vqa||reason_seg --sample_rates
9,3,3,1`: every example first picks a dataset with those odds, then an item from it. Here the
picks are drawn once from a seeded generator, so the mixture (and a resumed run) is reproducible.
Every pick is with replacement, so a batch larger than the data repeats examples inside itself
(a plain dataset refuses such a batch instead): `repeat_note` says so.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset


class MixtureDataset(Dataset):
    def __init__(self, datasets: list, rates: list[float], length: int, seed: int = 0):
        if len(rates) != len(datasets):
            raise ValueError(f"--sample-rates has {len(rates)} values for {len(datasets)} "
                             "datasets; give one rate per --data file")
        if any(not (rate >= 0 and math.isfinite(rate)) for rate in rates) or sum(rates) <= 0:
            raise ValueError(f"--sample-rates must be numbers >= 0, not all 0, got {rates}")
        if any(len(d) == 0 for d in datasets):
            raise ValueError("a dataset in the mixture is empty")
        g = torch.Generator().manual_seed(seed)
        probs = torch.tensor(rates, dtype=torch.float64)
        which = torch.multinomial(probs / probs.sum(), length, replacement=True, generator=g)
        self.datasets = datasets
        # Draw i: dataset which[i], then an item of it, in this order from one generator (so
        # the draws are those of every earlier version). Two flat arrays, not a tuple a draw.
        self.which = which.numpy().astype(np.int32)
        self.item = np.array([int(torch.randint(len(datasets[d]), (1,), generator=g))
                              for d in self.which.tolist()], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.which)

    def repeat_note(self, batch_size: int) -> str:
        """A line for the log when one batch must repeat examples, else ""."""
        distinct = sum(len(d) for d in self.datasets)
        if batch_size <= distinct:
            return ""
        return (f"note: a batch of {batch_size} is larger than the {distinct} examples of the "
                "mixture; batches repeat examples (drawn with replacement)")

    def __getitem__(self, i: int) -> dict:
        return self.datasets[self.which[i]][int(self.item[i])]

    def lengths(self) -> list[int]:
        per_dataset = [d.lengths() for d in self.datasets]
        return [per_dataset[d][j] for d, j in zip(self.which.tolist(), self.item.tolist())]

    def sources(self) -> list[str]:
        per_dataset = [d.sources() for d in self.datasets]
        return [per_dataset[d][j] for d, j in zip(self.which.tolist(), self.item.tolist())]
