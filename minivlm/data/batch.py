"""From `Sample`s to training tensors: chat template, image-token expansion, padding.

    Sample.turns ─► tokenizer.encode_chat ─► ids with one <image> id per placeholder, labels
    each <image> id ─► repeated (tiles x tokens-per-tile) times, labels -100 there
    Sample.images ─► load_image ─► ImageProcessor ─► (tiles, 3, S, S)
Everything that can be checked is checked when the dataset is built (lengths, [SEG]/mask counts,
and, when images are preloaded, every image decodes), so a bad record stops training before the
first step, with its file and record index, instead of hours in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from minivlm.constants import IGNORE_INDEX
from minivlm.data.images import MAX_IMAGE_PIXELS, image_size, load_image
from minivlm.data.sample import Sample


@dataclass
class EncodedSample:
    """A `Sample` after tokenisation: what the dataset keeps per item between epochs."""

    input_ids: list[int]
    labels: list[int]
    images: list  # paths, or preloaded (tiles, 3, S, S) tensors
    masks: list[np.ndarray]
    source: str
    task: str


class ChatDataset(Dataset):
    def __init__(self, samples: list[Sample], tokenizer, image_processor, tokens_per_tile: int,
                 max_seq_len: int, preload_images: bool = True, skip_bad: bool = False,
                 image_encoder=None, max_image_pixels: int = MAX_IMAGE_PIXELS):
        """`image_encoder` (with preloading): a frozen tower's pixels -> patch tokens function;
        each image is then encoded once here and stored as features, not pixels. A larger image
        than `max_image_pixels` is a bad record, found from its header even without preloading."""
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.max_image_pixels = max_image_pixels
        self.image_encoder = image_encoder
        self.tokens_per_tile = tokens_per_tile
        self.encoded: list[EncodedSample] = []
        self.errors: list[str] = []
        for sample in samples:
            try:
                self.encoded.append(self._build(sample, max_seq_len, preload_images))
            except ValueError as error:
                if not skip_bad:
                    raise
                self.errors.append(str(error))

    def _build(self, sample: Sample, max_seq_len: int, preload: bool) -> EncodedSample:
        try:
            # Headers first: an image over the pixel budget is refused before any decoding.
            sizes = [image_size(p, self.max_image_pixels) for p in sample.images]
            images = ([self.image_processor(load_image(p, max_pixels=self.max_image_pixels))
                       for p in sample.images] if preload else list(sample.images))
        except ValueError as error:  # the image's own message names the file; add the record
            raise ValueError(f"{sample.source}: {error}") from None
        if preload and self.image_encoder is not None:
            with torch.no_grad():
                images = [self.image_encoder(im) for im in images]  # (tiles, P, Dv) each
        tiles = [im.shape[0] if preload else self.image_processor.num_tiles(size)
                 for im, size in zip(images, sizes)]
        if sample.masks:  # masks pair with the first image, at its own size
            width, height = sizes[0]
            for k, mask in enumerate(sample.masks):
                if mask.shape != (height, width):
                    raise ValueError(f"{sample.source}: mask {k} is {mask.shape[1]}x{mask.shape[0]}"
                                     f" but the image is {width}x{height}")
        ids, labels = self.tokenizer.encode_chat(sample.turns)
        image_id = self.tokenizer.image_token_id
        if any(a == b == image_id for a, b in zip(ids, ids[1:])):
            # Their rows would form one unbroken run, which image attention
            # (models/attention_mask.py image_blocks) cannot tell apart into two images.
            raise ValueError(f"{sample.source}: two <image> placeholders with nothing between "
                             "them; put text (a newline will do) between images")
        ids, labels = expand_image_tokens(ids, labels, image_id,
                                          [t * self.tokens_per_tile for t in tiles])
        if len(ids) > max_seq_len:
            raise ValueError(f"{sample.source}: {len(ids)} tokens (images included) exceed the "
                             f"context of {max_seq_len}")
        num_seg = ids.count(self.tokenizer.seg_token_id)  # the model pairs every [SEG] with a mask
        if num_seg != len(sample.masks):
            raise ValueError(f"{sample.source}: {num_seg} [SEG] tokens to learn but "
                             f"{len(sample.masks)} masks")
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"{sample.source}: no assistant tokens to learn from")
        return EncodedSample(ids, labels, images, sample.masks, sample.source,
                             sample.meta.get("task", ""))

    def __len__(self) -> int:
        return len(self.encoded)

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.encoded]

    def sources(self) -> list[str]:
        """Each example's record ("file:index"), for messages about an example."""
        return [e.source for e in self.encoded]

    def __getitem__(self, index: int) -> dict:
        ex = self.encoded[index]
        pixels = [im if isinstance(im, torch.Tensor) else self._load(im, ex.source)
                  for im in ex.images]
        return dict(input_ids=ex.input_ids, labels=ex.labels, pixel_values=pixels,
                    masks=[torch.from_numpy(m) for m in ex.masks], source=ex.source)

    def _load(self, path, source: str) -> torch.Tensor:
        try:
            return self.image_processor(load_image(path, max_pixels=self.max_image_pixels))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def expand_image_tokens(ids: list[int], labels: list[int], image_token_id: int,
                        rows_per_image: list[int]) -> tuple[list[int], list[int]]:
    """Repeat the k-th <image> id rows_per_image[k] times; those positions are never labels."""
    out_ids, out_labels, k = [], [], 0
    for token, label in zip(ids, labels):
        if token == image_token_id:
            out_ids += [token] * rows_per_image[k]
            out_labels += [IGNORE_INDEX] * rows_per_image[k]
            k += 1
        else:
            out_ids.append(token)
            out_labels.append(label)
    if k != len(rows_per_image):
        raise ValueError(f"{k} <image> tokens in the text but {len(rows_per_image)} images")
    return out_ids, out_labels


def collate(batch: list[dict], pad_id: int, left_pad: bool = False) -> dict:
    """Pad to the longest sequence (right for training, left for generation) and stack tiles.

    `seg_tile_index[b]` is the tile that sample b's masks are predicted on: its first image's
    last tile (the thumbnail when tiled, else the image itself).
    """
    longest = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    tiles, masks = [], []
    for b, item in enumerate(batch):
        n = len(item["input_ids"])
        span = slice(longest - n, longest) if left_pad else slice(0, n)
        input_ids[b, span] = torch.tensor(item["input_ids"])
        labels[b, span] = torch.tensor(item["labels"])
        attention_mask[b, span] = 1
        tiles += item["pixel_values"]
        masks += item["masks"]
    pixel_values = torch.cat(tiles) if tiles else None  # (N_tiles, 3, S, S)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                pixel_values=pixel_values, masks=masks, seg_tile_index=seg_tile_index(batch))


def seg_tile_index(samples: list[dict]) -> torch.Tensor:
    """(N,) for N samples whose images are stacked in this order: the tile each sample's masks
    are predicted on, its first image's last tile (the thumbnail when tiled)."""
    index, tile_count = [], 0
    for item in samples:
        first_image_tiles = item["pixel_values"][0].shape[0] if item["pixel_values"] else 0
        index.append(tile_count + max(first_image_tiles - 1, 0))
        tile_count += sum(pixels.shape[0] for pixels in item["pixel_values"])
    return torch.tensor(index, dtype=torch.long)
