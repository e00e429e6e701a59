"""COCO segmentations to masks, in numpy: polygons and run-length encodings (RLE), no pycocotools.

A COCO annotation's "segmentation" is one of
    [[x1, y1, x2, y2, ...], ...]              polygons in pixel coordinates (refcoco, most of COCO)
    {"size": [h, w], "counts": [5, 3, ...]}   uncompressed RLE (COCO's iscrowd regions)
    {"size": [h, w], "counts": "OXR1..."}     compressed RLE (COCO's string form)
    [{"size", "counts"}, ...]                 a list of RLEs (LISA's refer reader accepts this)
An RLE counts runs of 0s, 1s, 0s, ... over the mask flattened column by column (Fortran order),
starting with a (possibly empty) run of 0s.

The polygon rasteriser is a port of pycocotools' rleFrPoly (cocoapi common/maskApi.c), so the
masks are the ones LISA trains on, pixel for pixel (checked against pycocotools 2.0.11 on random
polygons); the string codec ports rleToString / rleFrString. A reader keeps a CocoMask (the
segmentation, compact) and decodes it per item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minivlm.data.masks import MaskSource

POLYGON_SCALE = 5  # rleFrPoly upsamples the polygon 5x before it walks the boundary
C_INT_MIN = -(2 ** 31)  # what x86 gives for C's (int) of NaN, which rleFrPoly hits (see below)


# ---------------------------------------------------------------------------- RLE counts
def decode_counts(counts: list[int], height: int, width: int, where: str = "") -> np.ndarray:
    """Uncompressed RLE counts to an (H, W) uint8 mask of 0/1."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != height * width:
        raise ValueError(f"{where}: RLE counts should be non-negative and sum to "
                         f"{height}x{width} = {height * width}, found sum {int(counts.sum())}")
    values = np.arange(len(counts)) % 2  # 0, 1, 0, 1, ...: the runs alternate, 0s first
    flat = np.repeat(values.astype(np.uint8), counts)  # (W * H,) column by column
    return np.ascontiguousarray(flat.reshape(width, height).T)  # (H, W)


def encode_counts(mask: np.ndarray) -> list[int]:
    """An (H, W) 0/1 mask to uncompressed RLE counts (pycocotools' rleEncode)."""
    flat = (np.asarray(mask).T.reshape(-1) != 0).astype(np.int8)  # (W * H,) column by column
    changes = np.flatnonzero(np.diff(flat)) + 1  # where a run ends
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat.size and flat[0] == 1 else counts  # the first run counts 0s


def counts_to_string(counts: list[int]) -> str:
    """rleToString: each count (from the fourth on, minus the count two before) in 5-bit groups,
    low first, 0x20 marking "more follows", each group + 48 as one ASCII character."""
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: a negative delta ends in x == -1
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


def string_to_counts(text: str | bytes, where: str = "") -> list[int]:
    """rleFrString, the inverse of counts_to_string."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError(f"{where}: compressed RLE string ends inside a count")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"{where}: compressed RLE has character {text[p]!r} at {p}, "
                                 "expected ASCII 48-111")
            x |= (c & 0x1F) << 5 * k
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << 5 * k  # sign-extend a negative delta
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


# ---------------------------------------------------------------------------- polygons
def _boundary(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rleFrPoly, first step: every integer point along each (upsampled) edge, as a line
    drawing steps along the edge's longer axis."""
    us, vs = [], []
    for j in range(len(x) - 1):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            t = np.arange(dx + 1)
            t = dx - t if flip else t
            if dx == 0:  # a repeated vertex: C divides 0 by 0, and (int)NaN is INT_MIN on x86
                v = np.full(1, C_INT_MIN)
            else:
                v = np.trunc(ys + (ye - ys) / dx * t + 0.5).astype(np.int64)
            us.append(t + xs)
            vs.append(v)
        else:
            t = np.arange(dy + 1)
            t = dy - t if flip else t
            vs.append(t + ys)
            us.append(np.trunc(xs + (xe - xs) / dy * t + 0.5).astype(np.int64))
    return np.concatenate(us), np.concatenate(vs)


def polygon_counts(xy: list[float], height: int, width: int) -> list[int]:
    """One COCO polygon [x1, y1, x2, y2, ...] to uncompressed RLE counts, as pycocotools'
    rleFrPoly: a pixel column x is entered and left where the boundary crosses x's centre."""
    points = np.asarray(xy, dtype=np.float64).reshape(-1, 2)  # (K, 2)
    # C's (int) cast truncates toward zero, as np.trunc does.
    x = np.trunc(POLYGON_SCALE * points[:, 0] + 0.5).astype(np.int64)
    y = np.trunc(POLYGON_SCALE * points[:, 1] + 0.5).astype(np.int64)
    u, v = _boundary(np.append(x, x[0]), np.append(y, y[0]))  # closed: back to the first point

    # Second step: where the boundary moves to another column, the crossing of that column's
    # centre, downsampled; the first pixel at or below it toggles the column's inside/outside.
    moved = u[1:] != u[:-1]
    xd = np.where(u[1:] < u[:-1], u[1:], u[1:] - 1).astype(np.float64)
    xd = (xd + 0.5) / POLYGON_SCALE - 0.5
    yd = np.minimum(v[1:], v[:-1]).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / POLYGON_SCALE - 0.5, 0, height))
    keep = moved & (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    toggles = xd[keep].astype(np.int64) * height + yd[keep].astype(np.int64)  # column-major index
    a = np.sort(np.append(toggles, height * width))
    a = np.diff(a, prepend=0).tolist()  # run lengths between toggles

    # Two toggles at one place cancel: a zero-length run merges its neighbours.
    counts, j = [a[0]], 1
    while j < len(a):
        if a[j] > 0:
            counts.append(a[j])
            j += 1
        else:
            j += 1
            if j < len(a):
                counts[-1] += a[j]
                j += 1
    return counts


def pixel_outline(mask: np.ndarray) -> list[float]:
    """The polygon along the pixel edges around a mask's one 4-connected region without holes,
    as COCO's [x1, y1, x2, y2, ...]: polygon_counts gives back exactly the mask's pixels (a
    pixel is inside when its centre is). Used to write masks as COCO polygons."""
    mask = np.asarray(mask) != 0
    padded = np.pad(mask, 1)
    # Directed unit edges with the region on their right (image y points down), corner -> corner.
    following: dict[tuple[int, int], tuple[int, int]] = {}
    for y, x in zip(*np.nonzero(mask)):
        x, y = int(x), int(y)
        if not padded[y, x + 1]:  # nothing above
            following[(x, y)] = (x + 1, y)
        if not padded[y + 1, x + 2]:  # nothing to the right
            following[(x + 1, y)] = (x + 1, y + 1)
        if not padded[y + 2, x + 1]:  # nothing below
            following[(x + 1, y + 1)] = (x, y + 1)
        if not padded[y + 1, x]:  # nothing to the left
            following[(x, y + 1)] = (x, y)
    if not following:
        raise ValueError("pixel_outline: the mask is empty")
    start = min(following, key=lambda p: (p[1], p[0]))
    corners, point = [start], following[start]
    while point != start:
        corners.append(point)
        point = following[point]
    if len(corners) != len(following):
        raise ValueError("pixel_outline: the mask is not one region without holes")
    # Keep the corners where the direction changes.
    kept = [b for a, b, c in zip(corners[-1:] + corners[:-1], corners, corners[1:] + corners[:1])
            if (b[0] - a[0], b[1] - a[1]) != (c[0] - b[0], c[1] - b[1])]
    return [float(v) for corner in kept for v in corner]


# ---------------------------------------------------------------------------- segmentations
def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rle_mask(rle: dict, height: int, width: int, where: str) -> np.ndarray:
    size, counts = rle.get("size"), rle.get("counts")
    if size != [height, width] and size != (height, width):
        raise ValueError(f"{where}: RLE 'size' {size!r:.40} does not match the image's "
                         f"[height, width] [{height}, {width}]")
    if isinstance(counts, (str, bytes)):
        counts = string_to_counts(counts, where)
    elif not (isinstance(counts, list) and all(isinstance(c, int) for c in counts)):
        raise ValueError(f"{where}: RLE 'counts' should be a string or a list of integers")
    return decode_counts(counts, height, width, where)


def decode_segmentation(segmentation: object, height: int, width: int,
                        where: str = "") -> np.ndarray:
    """Any COCO segmentation (see the module docstring) to one (H, W) uint8 mask of 0/1: the
    union of its parts. (LISA sums the parts, which gives 2 where two polygons overlap; a mask
    here holds 0/1 only.) An empty list is an empty mask, as in LISA."""
    if isinstance(segmentation, dict):
        return _rle_mask(segmentation, height, width, where)
    if not isinstance(segmentation, list):
        raise ValueError(f"{where}: 'segmentation' should be a list of polygons or an RLE "
                         f"object, found {type(segmentation).__name__}")
    mask = np.zeros((height, width), dtype=np.uint8)
    for k, part in enumerate(segmentation):
        at = f"{where}: segmentation[{k}]"
        if isinstance(part, dict):
            mask |= _rle_mask(part, height, width, at)
            continue
        if not (isinstance(part, list) and all(_is_number(c) for c in part)):
            raise ValueError(f"{at}: expected a polygon [x1, y1, x2, y2, ...] or an RLE object")
        if len(part) % 2 or len(part) < 6:
            raise ValueError(f"{at}: polygon with {len(part)} coordinate(s), expected an even "
                             "number, at least 6 (3 points)")
        mask |= decode_counts(polygon_counts(part, height, width), height, width, at)
    return mask


@dataclass(frozen=True, eq=False)
class CocoMask(MaskSource):
    """A COCO segmentation kept compact until an item needs it: its polygons as float64 arrays and
    its RLEs as uncompressed counts (int64), the mask their union."""

    shape: tuple[int, int]  # (H, W)
    polygons: tuple[np.ndarray, ...]
    rle_counts: tuple[np.ndarray, ...]

    def decode(self) -> np.ndarray:
        height, width = self.shape
        mask = np.zeros((height, width), dtype=np.uint8)
        for counts in self.rle_counts:
            mask |= decode_counts(counts, height, width)
        for polygon in self.polygons:
            mask |= decode_counts(polygon_counts(polygon, height, width), height, width)
        return mask


def coco_mask(segmentation: object, height: int, width: int, where: str = "") -> CocoMask:
    """`decode_segmentation`'s mask as a CocoMask: checked (decoded once here, then dropped), so a
    malformed segmentation is an error when the data is read, not when the item is drawn."""
    decode_segmentation(segmentation, height, width, where)
    parts = [segmentation] if isinstance(segmentation, dict) else segmentation
    polygons, rles = [], []
    for part in parts:
        if isinstance(part, dict):
            counts = part["counts"]
            counts = string_to_counts(counts) if isinstance(counts, (str, bytes)) else counts
            rles.append(np.asarray(counts, dtype=np.int64))
        else:
            polygons.append(np.asarray(part, dtype=np.float64))
    return CocoMask((height, width), tuple(polygons), tuple(rles))
