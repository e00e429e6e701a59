"""Samples into a RecordStore: every check that needs no decoded pixel, and the tokenisation.

Per sample, in this order (the first check that fails is the record's one-line error):
    image headers   each image's size and pixel budget, read once per distinct image
    masks           each as large as the first image (the one the masks are drawn on)
    tokens          encode_chat; no two <image> placeholders side by side; one <image> id per
                    image; the length with the images expanded within max_seq_len; one [SEG] per
                    mask; something to learn
Samples stream in one at a time (a reader's generator) and leave nothing but their rows in the
store, so a file of any size costs its tokens, not its Python objects.

Tokenising is most of the time it takes (encode_chat ~0.2-0.7 ms a record); with `workers` >= 2,
chunks of TOKENIZE_CHUNK samples are tokenised in a pool of forked processes (which inherit the
tokenizer, nothing is pickled but the turns and the ids), while this process reads the next ones
and checks the finished ones in order. A set of one chunk never starts the pool.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing
from typing import Iterable, Iterator

import numpy as np

from minivlm.constants import IGNORE_INDEX
from minivlm.data.images import MAX_IMAGE_PIXELS, ImageError, image_size
from minivlm.data.record_store import RecordStore, RecordStoreBuilder
from minivlm.data.sample import Sample

TOKENIZE_CHUNK = 256  # samples per pool task
Tokens = tuple[np.ndarray, np.ndarray] | str  # (ids, trained), or what encode_chat raised


def tokenize(tokenizer, conversations: list[list[dict]]) -> list[Tokens]:
    """encode_chat of each conversation as (ids int32, trained bool), or its error message."""
    out: list[Tokens] = []
    for turns in conversations:
        try:
            ids, labels = tokenizer.encode_chat(turns)
        except ValueError as error:
            out.append(str(error))
            continue
        out.append((np.asarray(ids, dtype=np.int32), np.asarray(labels) != IGNORE_INDEX))
    return out


_worker_tokenizer = None  # a pool worker's tokenizer, inherited from the parent through fork


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _tokenize_in_worker(conversations: list[list[dict]]) -> list[Tokens]:
    return tokenize(_worker_tokenizer, conversations)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


class RecordEncoder:
    def __init__(self, tokenizer, image_processor, tokens_per_tile: int, max_seq_len: int,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, workers: int = 0):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.tokens_per_tile, self.max_seq_len = tokens_per_tile, max_seq_len
        self.max_image_pixels, self.workers = max_image_pixels, workers
        self._image_rows: dict = {}  # image source -> its row in the table, or its error

    def encode(self, samples: Iterable[Sample],
               skip_bad: bool = False) -> tuple[RecordStore, list[str]]:
        """(the store, the bad records' one-line errors); a bad record raises unless skip_bad."""
        builder, errors = RecordStoreBuilder(), []
        for sample, tokens in self._tokenized(samples):
            try:
                self._add(builder, sample, tokens)
            except ValueError as error:
                if not skip_bad:
                    raise
                errors.append(str(error))
        self._image_rows = {}
        return builder.finish(), errors

    # ---- tokens, in this process or a pool
    def _tokenized(self, samples: Iterable[Sample]) -> Iterator[tuple[Sample, Tokens]]:
        pool, in_flight = None, collections.deque()
        try:
            for k, chunk in enumerate(_chunks(samples, TOKENIZE_CHUNK)):
                conversations = [s.turns for s in chunk]
                if pool is None and k == 1 and self.workers >= 2 and can_fork():
                    pool = multiprocessing.get_context("fork").Pool(
                        self.workers, _init_worker, (self.tokenizer,))
                if pool is None:
                    yield from zip(chunk, tokenize(self.tokenizer, conversations))
                    continue
                in_flight.append((chunk, pool.apply_async(_tokenize_in_worker,
                                                          (conversations,))))
                while len(in_flight) > 2 * self.workers:  # read ahead, but only so far
                    done, result = in_flight.popleft()
                    yield from zip(done, result.get())
            while in_flight:
                done, result = in_flight.popleft()
                yield from zip(done, result.get())
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    # ---- one record
    def _image_row(self, builder: RecordStoreBuilder, source) -> int:
        """The image's row in the table, added on first sight (header read once per image)."""
        found = self._image_rows.get(source)
        if found is None:
            try:
                size = image_size(source, self.max_image_pixels)
            except ValueError as error:
                found = self._image_rows[source] = str(error)
            else:
                found = self._image_rows[source] = builder.add_image(
                    source, size, self.image_processor.num_tiles(size))
        if isinstance(found, str):
            raise ImageError(found)
        return found

    def _add(self, builder: RecordStoreBuilder, sample: Sample, tokens: Tokens) -> None:
        where = sample.source
        try:  # the image's own message names the file; the record is added in front
            rows = [self._image_row(builder, image) for image in sample.images]
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if sample.masks:  # masks pair with the first image, at its own size
            width, height = int(builder.widths[rows[0]]), int(builder.heights[rows[0]])
            for k, mask in enumerate(sample.masks):
                if tuple(mask.shape) != (height, width):
                    raise ValueError(f"{where}: mask {k} is {mask.shape[1]}x{mask.shape[0]} "
                                     f"but the image is {width}x{height}")
        if isinstance(tokens, str):
            raise ValueError(f"{where}: {tokens}")
        ids, trained = tokens
        is_image = ids == self.tokenizer.image_token_id
        if (is_image[1:] & is_image[:-1]).any():
            # Their rows would form one unbroken run, which image attention
            # (models/attention_mask.py image_blocks) cannot tell apart into two images.
            raise ValueError(f"{where}: two <image> placeholders with nothing between them; "
                             "put text (a newline will do) between images")
        if int(is_image.sum()) != len(rows):
            raise ValueError(f"{where}: {int(is_image.sum())} <image> tokens in the text but "
                             f"{len(rows)} images")
        image_rows = sum(int(builder.tiles[r]) * self.tokens_per_tile for r in rows)
        length = len(ids) - len(rows) + image_rows
        if length > self.max_seq_len:
            raise ValueError(f"{where}: {length} tokens (images included) exceed the context "
                             f"of {self.max_seq_len}")
        num_seg = int((ids == self.tokenizer.seg_token_id).sum())  # each [SEG] needs a mask
        if num_seg != len(sample.masks):
            raise ValueError(f"{where}: {num_seg} [SEG] tokens to learn but "
                             f"{len(sample.masks)} masks")
        trained = trained & ~is_image  # image rows are never labels
        if not trained.any():
            raise ValueError(f"{where}: no assistant tokens to learn from")
        builder.add_record(ids, trained, length, rows, where, sample.meta.get("task", ""),
                           sample.masks)
