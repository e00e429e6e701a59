"""Sequence packing: several examples end to end in one row of up to max_seq_len tokens.

    lengths ─► first_fit_decreasing ─► bins (tuples of example indices), each <= max_seq_len
    a bin ─► PackedRows[bin] ─► its examples ─► collate_packed ─► one row, samples end to end
A padded batch of a long-tailed dataset is mostly padding (the longest example sets the width);
a packed row is mostly real tokens. The model keeps the samples apart: `document_ids` gives each
token its sample, and models/attention_mask.py turns that into a block-diagonal causal mask with
positions restarting at every sample, so a packed sample computes exactly what it would alone.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from minivlm.constants import IGNORE_INDEX
from minivlm.data.batch import collate, seg_images, seg_tile_index


def first_fit_decreasing(lengths: list[int], capacity: int,
                         names: list[str] | None = None) -> list[tuple[int, ...]]:
    """Bins of example indices, no bin over `capacity` tokens: longest example first, each into
    the first bin with room, else a new bin (Johnson 1973: at most 11/9 of the optimum + 1).
    Ties keep the input order. An example longer than `capacity` is an error naming it."""
    for i, length in enumerate(lengths):
        if length > capacity:
            name = names[i] if names is not None else f"example {i}"
            raise ValueError(f"{name}: {length} tokens do not fit one packed row of "
                             f"max_seq_len={capacity} (--pack)")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    room = np.zeros(len(lengths), dtype=np.int64)  # room left in each bin opened so far
    bins: list[list[int]] = []
    for i in order:
        fits = room[:len(bins)] >= lengths[i]
        b = int(fits.argmax()) if fits.any() else len(bins)  # argmax: the first True
        if b == len(bins):
            bins.append([])
            room[b] = capacity
        bins[b].append(i)
        room[b] -= lengths[i]
    return [tuple(b) for b in bins]


class PackedRows(Dataset):
    """`dataset` seen one packed row at a time: item `bin` (a tuple of indices) is the list of
    those examples, in that order. The DataLoader's batch sampler yields lists of bins."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, bin_: tuple[int, ...]) -> list[dict]:
        return [self.dataset[i] for i in bin_]


def join_samples(samples: list[dict]) -> dict:
    """One row from several examples, end to end; images and masks follow the same order."""
    labels = []
    for item in samples:
        # The first token of a sample is never predicted from the previous sample's last token.
        labels += [IGNORE_INDEX] + item["labels"][1:]
    return dict(input_ids=[t for item in samples for t in item["input_ids"]], labels=labels,
                pixel_values=[p for item in samples for p in item["pixel_values"]],
                masks=[m for item in samples for m in item["masks"]])


def collate_packed(rows: list[list[dict]], pad_id: int) -> dict:
    """`collate` of packed rows, plus `document_ids` (B, T): each token's sample, numbered 1..N
    over the whole batch in packed order (0 = padding). `seg_tile_index` then has one entry per
    sample in that order, as VLM.forward reads it through document_ids."""
    batch = collate([join_samples(row) for row in rows], pad_id)
    samples = [item for row in rows for item in row]
    batch["seg_tile_index"] = seg_tile_index(samples)
    batch.update(seg_images(samples))  # SAM's images of the masks, when items carry them
    document_ids = torch.zeros_like(batch["input_ids"])  # (B, T)
    number = 0
    for b, row in enumerate(rows):
        start = 0
        for item in row:
            number += 1
            document_ids[b, start:start + len(item["input_ids"])] = number
            start += len(item["input_ids"])
    batch["document_ids"] = document_ids
    return batch
