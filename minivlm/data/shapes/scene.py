"""Scenes of the synthetic shapes world: sampling, drawing, describing, splitting.

A scene is 1-4 non-overlapping shapes on a white square. Every shape is drawn from one
integer polygon, the same polygon the ReasonSeg JSON stores, so a mask rasterised by the
reader covers exactly the pixels painted in that shape's colour. Within a scene no two
shapes share both colour and kind, so "the red circle" always names exactly one shape.

Train/val/test are split by content: a scene's split is a pure function of a coarse
canonical key (kind, colour, size class and 4x4 grid cell of each shape), so near-identical
scenes (the same shapes a pixel apart) can never land in two splits, whatever the seed.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
# Saturated, far-apart colours that stay distinct after JPEG at 32x32 and after 2x2 patching.
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230),
           "yellow": (240, 200, 20)}
BACKGROUND = (255, 255, 255)
SPLIT_CELLS = 4  # the canonical key places each centre on a 4x4 grid
SPLIT_PERCENT = {"train": 80, "val": 10, "test": 10}  # share of key-hash space per split


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    x0: int  # left column of the bounding box
    y0: int  # top row of the bounding box
    size: int  # bounding-box side in pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def cx(self) -> float:
        return self.x0 + (self.size - 1) / 2

    @property
    def cy(self) -> float:
        return self.y0 + (self.size - 1) / 2

    def polygon(self) -> list[tuple[int, int]]:
        """Integer vertices; drawn filled with a 1-px outline, covering the size x size box."""
        x0, y0, last = self.x0, self.y0, self.size - 1
        if self.kind == "square":
            return [(x0, y0), (x0 + last, y0), (x0 + last, y0 + last), (x0, y0 + last)]
        if self.kind == "triangle":
            return [(x0 + round(last / 2), y0), (x0 + last, y0 + last), (x0, y0 + last)]
        radius, num_points = last / 2, max(16, 2 * self.size)  # enough points to read as round
        points = [(round(self.cx + radius * math.cos(2 * math.pi * k / num_points)),
                   round(self.cy + radius * math.sin(2 * math.pi * k / num_points)))
                  for k in range(num_points)]
        return [p for i, p in enumerate(points) if p != points[i - 1]]  # drop repeated vertices


Scene = tuple[Shape, ...]


def shape_mask(shape: Shape, image_size: int) -> np.ndarray:
    """(H, W) uint8, 1 on the shape's pixels: the same drawing call as `render`."""
    canvas = Image.new("L", (image_size, image_size), 0)
    ImageDraw.Draw(canvas).polygon(shape.polygon(), fill=1, outline=1)
    return np.array(canvas)


def shape_area(shape: Shape, image_size: int) -> int:
    return int(shape_mask(shape, image_size).sum())


def render(scene: Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene:
        draw.polygon(shape.polygon(), fill=COLOURS[shape.colour], outline=COLOURS[shape.colour])
    return image


def sample_scene(rng: random.Random, image_size: int, num_shapes: int, size_range: tuple[int, int],
                 gap: int) -> Scene:
    """Rejection-sample `num_shapes` shapes of distinct (colour, kind), boxes `gap` px apart."""
    pairs = rng.sample([(kind, colour) for kind in KINDS for colour in COLOURS], num_shapes)
    for _ in range(1000):  # restart with new sizes when the boxes do not fit
        placed: list[Shape] = []
        for kind, colour in pairs:
            size = rng.randint(*size_range)
            last = image_size - 1 - size  # the largest x0 or y0 that leaves a 1-px border
            for _ in range(30):
                x0, y0 = rng.randint(1, last), rng.randint(1, last)
                if all(_apart(x0, y0, size, other, gap) for other in placed):
                    placed.append(Shape(kind, colour, x0, y0, size))
                    break
            else:
                break
        if len(placed) == num_shapes:
            return tuple(placed)
    raise ValueError(f"cannot place {num_shapes} shapes of {size_range} px "
                     f"in a {image_size} px image")


def _apart(x0: int, y0: int, size: int, other: Shape, gap: int) -> bool:
    """True when the two boxes are separated by at least `gap` empty pixels along some axis."""
    return (x0 + size + gap <= other.x0 or other.x0 + other.size + gap <= x0
            or y0 + size + gap <= other.y0 or other.y0 + other.size + gap <= y0)


# ---------------------------------------------------------------------------- split by content
def scene_key(scene: Scene, image_size: int, size_range: tuple[int, int]) -> str:
    """Coarse canonical form: order-free, and a pixel shift or a size change within a class
    keeps the same key."""
    middle = (size_range[0] + size_range[1]) / 2
    cell = image_size / SPLIT_CELLS
    parts = sorted(f"{s.colour}-{s.kind}-{'large' if s.size >= middle else 'small'}"
                   f"-{int(s.cx // cell)}-{int(s.cy // cell)}" for s in scene)
    return "|".join(parts)


def split_of(key: str) -> str:
    """The split a scene belongs to: sha256 of its key, mod 100, cut by SPLIT_PERCENT (no seed)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    for split, percent in SPLIT_PERCENT.items():
        if bucket < percent:
            return split
        bucket -= percent
    raise AssertionError("SPLIT_PERCENT must sum to 100")


# ---------------------------------------------------------------------------- words
def position_words(shape: Shape, image_size: int) -> str:
    """Thirds of the image: "top left", "right", "centre", ..."""
    third = image_size / 3
    row = "top" if shape.cy < third else "bottom" if shape.cy >= 2 * third else ""
    column = "left" if shape.cx < third else "right" if shape.cx >= 2 * third else ""
    return " ".join(w for w in (row, column) if w) or "centre"


def join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def shape_phrases(scene: Scene, image_size: int) -> list[str]:
    """"a red circle at the top left", ... left to right (a fixed order the model can learn)."""
    ordered = sorted(scene, key=lambda s: (s.cx, s.cy))
    phrases = []
    for shape in ordered:
        where = position_words(shape, image_size)
        phrases.append(f"a {shape.name} {'in the' if where == 'centre' else 'at the'} {where}")
    return phrases


def describe_scene(scene: Scene, image_size: int) -> str:
    """The full ground-truth description (the open "Describe the image." answer)."""
    count = len(scene)
    return f"There {'is' if count == 1 else 'are'} {count} shape{'s' * (count > 1)}: " + join_words(
        shape_phrases(scene, image_size)) + "."


def caption_scene(scene: Scene, image_size: int) -> str:
    return join_words(shape_phrases(scene, image_size)) + "."


def scene_to_json(scene: Scene) -> list[dict]:
    return [asdict(shape) for shape in scene]


def scene_from_json(items: list[dict]) -> Scene:
    return tuple(Shape(**item) for item in items)
