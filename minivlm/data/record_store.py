"""Tokenised records held compactly: a few flat numpy arrays for the whole dataset.

A Python list of ids costs 8 bytes a token for the pointer and 28 more for each id over 256, and
the DataLoader's forked workers copy every page whose reference counts they touch. Here a record is
a slice of flat arrays, which workers share (and a cached index memory-maps: record_index.py):

    token_ids[token_offsets[i]:token_offsets[i + 1]]   record i's ids, one <image> id per image
    trained[...same slice...]                           True where the label is the id, else -100
    lengths[i]                                          its length with the images expanded
    image_refs[image_offsets[i]:image_offsets[i + 1]]   its images, as rows of the image table
    images                                              each distinct image once: its source
                                                        (path or bytes), width, height, tiles
    sources[i], task_names[tasks[i]], masks.get(i)      "file.json:17", "vqa", its MaskSources
"""
from __future__ import annotations

import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minivlm.data.images import ImageSource

PATH, BYTES = 0, 1  # how an image table row's bytes are to be read


def _wrap(buffer, dtype) -> np.ndarray:
    """A builder's buffer as a numpy array, without a copy (the buffer can no longer grow)."""
    return np.frombuffer(buffer, dtype=dtype) if len(buffer) else np.zeros(0, dtype)


class StringTable:
    """Strings (or bytes) end to end in one buffer: item i is blob[offsets[i]:offsets[i + 1]]."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets  # (B,) uint8, (N + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, index: int) -> bytes:
        return self.blob[self.offsets[index]:self.offsets[index + 1]].tobytes()

    def __getitem__(self, index: int) -> str:
        return self.raw(index).decode("utf-8")


class StringTableBuilder:
    def __init__(self):
        self.blob, self.offsets = bytearray(), array.array("q", [0])

    def add(self, data: bytes) -> None:
        self.blob += data
        self.offsets.append(len(self.blob))

    def finish(self) -> StringTable:
        return StringTable(_wrap(self.blob, np.uint8), _wrap(self.offsets, np.int64))


@dataclass
class ImageTable:
    """Each distinct image of a dataset once, in the order records first name it."""

    sources: StringTable  # a path's UTF-8 bytes, or the encoded image's own bytes
    kinds: np.ndarray  # (M,) uint8: PATH or BYTES
    widths: np.ndarray  # (M,) int32, as load_image returns it (EXIF orientation applied)
    heights: np.ndarray  # (M,) int32
    tiles: np.ndarray  # (M,) int32: tiles the image processor cuts it into

    def __len__(self) -> int:
        return len(self.kinds)

    def source(self, index: int) -> ImageSource:
        raw = self.sources.raw(index)
        return raw if self.kinds[index] == BYTES else Path(raw.decode("utf-8"))


@dataclass
class RecordStore:
    token_ids: np.ndarray  # (T,) int32
    trained: np.ndarray  # (T,) bool
    token_offsets: np.ndarray  # (N + 1,) int64
    lengths: np.ndarray  # (N,) int32
    image_refs: np.ndarray  # (R,) int32
    image_offsets: np.ndarray  # (N + 1,) int64
    images: ImageTable
    sources: StringTable
    tasks: np.ndarray  # (N,) uint8
    task_names: list[str]
    masks: dict[int, list] = field(default_factory=dict)  # record -> its masks, when it has any

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        span = slice(self.token_offsets[index], self.token_offsets[index + 1])
        return self.token_ids[span], self.trained[span]

    def image_rows(self, index: int) -> np.ndarray:
        return self.image_refs[self.image_offsets[index]:self.image_offsets[index + 1]]

    def task(self, index: int) -> str:
        return self.task_names[self.tasks[index]]

    def select(self, keep: np.ndarray) -> RecordStore:
        """The records where `keep` (N,) is True, re-numbered 0.. in their order."""
        def rows(values, offsets):  # the kept records' slices of `values`, end to end
            counts = np.diff(offsets)
            new_offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
            return values[np.repeat(keep, counts)], new_offsets

        token_ids, token_offsets = rows(self.token_ids, self.token_offsets)
        trained, _ = rows(self.trained, self.token_offsets)
        image_refs, image_offsets = rows(self.image_refs, self.image_offsets)
        sources = StringTable(*rows(self.sources.blob, self.sources.offsets))
        new_index = np.cumsum(keep) - 1  # old record -> new record (where kept)
        masks = {int(new_index[i]): m for i, m in self.masks.items() if keep[i]}
        return RecordStore(token_ids, trained, token_offsets, self.lengths[keep], image_refs,
                           image_offsets, self.images, sources, self.tasks[keep],
                           self.task_names, masks)


class RecordStoreBuilder:
    """Appends records (and images) one at a time without a Python object per token; `finish`
    wraps the buffers as numpy arrays without copying them."""

    def __init__(self):
        self.token_ids, self.trained = array.array("i"), array.array("b")
        self.token_offsets, self.lengths = array.array("q", [0]), array.array("i")
        self.image_refs, self.image_offsets = array.array("i"), array.array("q", [0])
        self.sources, self.tasks, self.task_names = StringTableBuilder(), array.array("B"), []
        self.image_sources, self.kinds = StringTableBuilder(), array.array("B")
        self.widths, self.heights, self.tiles = (array.array("i") for _ in range(3))
        self.masks: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def add_image(self, source: ImageSource, size: tuple[int, int], tiles: int) -> int:
        is_bytes = isinstance(source, bytes)
        self.image_sources.add(source if is_bytes else str(source).encode("utf-8"))
        self.kinds.append(BYTES if is_bytes else PATH)
        self.widths.append(size[0])
        self.heights.append(size[1])
        self.tiles.append(tiles)
        return len(self.kinds) - 1

    def add_record(self, ids: np.ndarray, trained: np.ndarray, length: int, images: list[int],
                   source: str, task: str, masks: list) -> None:
        self.token_ids.frombytes(ids.astype(np.int32).tobytes())
        self.trained.frombytes(trained.astype(np.int8).tobytes())
        self.token_offsets.append(len(self.token_ids))
        self.lengths.append(length)
        self.image_refs.extend(images)
        self.image_offsets.append(len(self.image_refs))
        self.sources.add(source.encode("utf-8"))
        if task not in self.task_names:
            self.task_names.append(task)
        self.tasks.append(self.task_names.index(task))
        if masks:
            self.masks[len(self.lengths) - 1] = list(masks)

    def finish(self) -> RecordStore:
        images = ImageTable(self.image_sources.finish(), _wrap(self.kinds, np.uint8),
                            _wrap(self.widths, np.int32), _wrap(self.heights, np.int32),
                            _wrap(self.tiles, np.int32))
        return RecordStore(_wrap(self.token_ids, np.int32),
                           _wrap(self.trained, np.int8).view(np.bool_),
                           _wrap(self.token_offsets, np.int64), _wrap(self.lengths, np.int32),
                           _wrap(self.image_refs, np.int32), _wrap(self.image_offsets, np.int64),
                           images, self.sources.finish(), _wrap(self.tasks, np.uint8),
                           list(self.task_names), self.masks)
