"""A mask as the file holds it, decoded when an item needs it.

A decoded mask is an (H, W) uint8 array: one byte a pixel, 300 KB for a COCO image, kept for every
[SEG] of every record for the whole run. The file holds far less: labelme polygons (ReasonSeg),
a COCO polygon or run-length encoding (refcoco), or a class id into a label PNG that is on disk
anyway (ADE20K, COCO-Stuff). So the readers keep that (a `MaskSource`) and the data loader's
workers decode it per item, as they decode the image.

    reader ─► MaskSource (shape + what the file holds) ─► Sample.masks
    ChatDataset item / eval ─► decode_mask ─► (H, W) uint8 of 0 (background), 1 (object), 255

The readers check each source once when they read it (by decoding it and dropping the array), so
a bad polygon still stops training before the first step. A hand-made Sample may hold arrays
instead; `decode_mask` passes those through. `np.asarray(source)` decodes too, so numpy code
(np.array_equal, np.unique) takes either.
"""
from __future__ import annotations

import numpy as np


class MaskSource:
    """One mask, not decoded: `shape` is (H, W) of the image it belongs to; `decode()` gives the
    (H, W) uint8 array (0, 1, 255), the same every time. Subclasses hold the file's form."""

    shape: tuple[int, int]

    def decode(self) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        mask = self.decode()
        return mask if dtype is None else mask.astype(dtype)


def decode_mask(mask: MaskSource | np.ndarray) -> np.ndarray:
    """The (H, W) uint8 array of a mask source, or the array itself."""
    return mask.decode() if isinstance(mask, MaskSource) else mask


def decode_masks(masks: list) -> list[np.ndarray]:
    """Every mask of a Sample (`sample.masks`) as an array, in order."""
    return [decode_mask(m) for m in masks]
