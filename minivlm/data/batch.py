"""From `Sample`s to training tensors: chat template, image-token expansion, padding.

    Sample.turns ─► tokenizer.encode_chat ─► ids with one <image> id per placeholder, labels
    each <image> id ─► repeated (tiles x tokens-per-tile) times, labels -100 there
    Sample.images ─► load_image ─► ImageProcessor ─► (tiles, 3, S, S)
                   (or a frozen tower's patch tokens, from data/feature_cache.py)
    Sample.masks ─► decode_mask (data/masks.py) ─► (H, W) uint8 each
    a mask's image ─► SAM's image embedding (C, g, g), from the same cache (--seg-image-encoder sam)
Everything that can be checked without decoding is checked when the dataset is built (image
headers, lengths, [SEG]/mask counts: record_encoder.py), so a bad record stops training before the
first step, with its file and record index, instead of hours in. The records are kept as flat
arrays (record_store.py); an item's images and masks are decoded when the item is drawn, in the
DataLoader's workers. `preload_images` decodes every distinct image once up front instead (a small
set; it also proves that every image decodes). What only decoding finds follows `skip_bad`
(late_skips.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from minivlm.constants import IGNORE_INDEX
from minivlm.data.feature_cache import FeatureCache
from minivlm.data.images import MAX_IMAGE_PIXELS, load_image
from minivlm.data.late_skips import record_late_skip, stand_in_order
from minivlm.data.masks import decode_mask
from minivlm.data.record_encoder import RecordEncoder
from minivlm.data.record_store import PATH, RecordStore
from minivlm.data.sample import Sample


class ChatDataset(Dataset):
    def __init__(self, samples: Iterable[Sample] | RecordStore, tokenizer, image_processor,
                 tokens_per_tile: int, max_seq_len: int, preload_images: bool = False,
                 skip_bad: bool = False, feature_cache: FeatureCache | None = None,
                 seg_image_cache: FeatureCache | None = None,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, tokenize_workers: int = 0,
                 errors: list[str] | None = None):
        """`samples` (any iterable, read once) are encoded here (record_encoder.py); a
        RecordStore is taken as it is, with the `errors` found when it was built (a cached index,
        record_index.py). `feature_cache`: a frozen tower's patch tokens per image, which replace
        the pixels; `seg_image_cache`: SAM's image embedding of each mask's image (its first
        image). Both are filled here (prepare_images). A larger image than `max_image_pixels`
        is a bad record, found from its header."""
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.tokens_per_tile, self.max_image_pixels = tokens_per_tile, max_image_pixels
        self.skip_bad = skip_bad
        self.errors: list[str] = list(errors or [])
        if isinstance(samples, RecordStore):
            self.records = samples
        else:
            encoder = RecordEncoder(tokenizer, image_processor, tokens_per_tile, max_seq_len,
                                    max_image_pixels, tokenize_workers)
            self.records, found = encoder.encode(samples, skip_bad)
            self.errors += found
        self.feature_cache = self.seg_image_cache = None
        self.held: dict[int, torch.Tensor] = {}  # image row -> its preloaded pixels (features)
        self.held_seg: dict[int, torch.Tensor] = {}  # image row -> its preloaded SAM embedding
        self.late_skip_log: tuple[Path | None, str] | None = None  # (skipped.jsonl, data)
        if preload_images or feature_cache is not None or seg_image_cache is not None:
            self.prepare_images(preload_images, feature_cache, seg_image_cache)

    # ---- what the training loop asks of a dataset
    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        return self.records.lengths.tolist()

    def sources(self) -> list[str]:
        """Each example's record ("file:index"), for messages about an example."""
        return [self.records.sources[i] for i in range(len(self))]

    def image_paths(self) -> list[Path]:
        """Every distinct image file the examples name (not those given as bytes)."""
        table = self.records.images
        return [table.source(r) for r in range(len(table)) if table.kinds[r] == PATH]

    def _seg_rows(self) -> set[int]:
        """The first image of every example with masks: the one its masks are drawn on."""
        return {int(self.records.image_rows(i)[0]) for i in self.records.masks}

    def seg_image_paths(self) -> list[Path]:
        table = self.records.images
        return [table.source(r) for r in sorted(self._seg_rows()) if table.kinds[r] == PATH]

    # ---- images up front: preloading, frozen encoders' caches
    def prepare_images(self, preload: bool, feature_cache: FeatureCache | None = None,
                       seg_image_cache: FeatureCache | None = None) -> None:
        """Fill the caches for every image (their entries are then read per item), and with
        `preload` decode (or read) each distinct image once and hold it. An image that fails
        makes every example that shows it a bad record (raised, or left out under skip_bad)."""
        self.feature_cache, self.seg_image_cache = feature_cache, seg_image_cache
        table, failed = self.records.images, {}
        seg_rows = self._seg_rows() if seg_image_cache is not None else set()
        for row in range(len(table)):
            source = table.source(row)
            try:
                if feature_cache is not None:
                    entry = feature_cache.ensure(source)
                    if preload:
                        self.held[row] = feature_cache.read(entry)
                elif preload:
                    self.held[row] = self._decode(source)
                if row in seg_rows:
                    entry = seg_image_cache.ensure(source)
                    if preload:
                        self.held_seg[row] = seg_image_cache.read(entry)
            except ValueError as error:
                failed[row] = str(error)
        if failed:
            self._drop_examples_showing(failed)

    def _drop_examples_showing(self, failed: dict[int, str]) -> None:
        keep = np.ones(len(self), dtype=bool)
        for i in range(len(self)):
            bad = [r for r in self.records.image_rows(i).tolist() if r in failed]
            if bad:
                message = f"{self.records.sources[i]}: {failed[bad[0]]}"
                if not self.skip_bad:
                    raise ValueError(message)
                self.errors.append(message)
                keep[i] = False
        self.records = self.records.select(keep)  # the same image table: `held` stays valid

    # ---- items
    def __getitem__(self, index: int) -> dict:
        try:
            return self._item(index)
        except ValueError as error:
            if not self.skip_bad:
                raise
            return self._stand_in(index, str(error))

    def _item(self, index: int) -> dict:
        records = self.records
        ids, trained = records.tokens(index)
        rows = records.image_rows(index).tolist()
        source = records.sources[index]
        input_ids, labels = expand_image_tokens(
            ids.tolist(), np.where(trained, ids, IGNORE_INDEX).tolist(),
            self.tokenizer.image_token_id,
            [int(records.images.tiles[r]) * self.tokens_per_tile for r in rows])
        masks = records.masks.get(index, [])
        try:  # the image's (or label's) own message names the file; the record is added
            item = dict(input_ids=input_ids, labels=labels,
                        pixel_values=[self._pixels(r) for r in rows],
                        masks=[torch.from_numpy(decode_mask(m)) for m in masks], source=source)
            if masks and self.seg_image_cache is not None:
                item["seg_image"] = self.held_seg.get(rows[0])
                if item["seg_image"] is None:
                    item["seg_image"] = self.seg_image_cache.get(records.images.source(rows[0]))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        return item

    def _pixels(self, row: int) -> torch.Tensor:
        held = self.held.get(row)
        if held is not None:
            return held
        source = self.records.images.source(row)
        if self.feature_cache is not None:
            return self.feature_cache.get(source)
        return self._decode(source)

    def _decode(self, source) -> torch.Tensor:
        return self.image_processor(load_image(source, max_pixels=self.max_image_pixels))

    def _stand_in(self, index: int, message: str) -> dict:
        """An example that failed to decode, replaced as late_skips.py says."""
        for other in stand_in_order(index, self.records.lengths).tolist():
            try:
                item = self._item(other)
            except ValueError:
                continue
            log, data = self.late_skip_log or (None, "")
            record_late_skip(log, data, message, item["source"])
            return item
        raise ValueError(f"{message} (--skip-bad: and none of the next examples as short "
                         "decodes in its place)")


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
    last tile (the thumbnail when tiled, else the image itself). Items that carry a "seg_image"
    (SAM's embedding or pixels of the masks' image) give `seg_images`, stacked, and the index
    then points into those instead.
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
    out = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
               pixel_values=pixel_values, masks=masks, seg_tile_index=seg_tile_index(batch))
    out.update(seg_images(batch))
    return out


def seg_images(samples: list[dict]) -> dict:
    """{} when no sample carries a "seg_image"; else `seg_images` (N_seg, ...), one per sample
    that has one, and `seg_tile_index` (N,) pointing into them (0 for the samples without)."""
    images = [item["seg_image"] for item in samples if "seg_image" in item]
    if not images:
        return {}
    index, row = [], 0
    for item in samples:
        index.append(row if "seg_image" in item else 0)
        row += "seg_image" in item
    return dict(seg_images=torch.stack(images), seg_tile_index=torch.tensor(index))


def seg_tile_index(samples: list[dict]) -> torch.Tensor:
    """(N,) for N samples whose images are stacked in this order: the tile each sample's masks
    are predicted on, its first image's last tile (the thumbnail when tiled)."""
    index, tile_count = [], 0
    for item in samples:
        first_image_tiles = item["pixel_values"][0].shape[0] if item["pixel_values"] else 0
        index.append(tile_count + max(first_image_tiles - 1, 0))
        tile_count += sum(pixels.shape[0] for pixels in item["pixel_values"])
    return torch.tensor(index, dtype=torch.long)
