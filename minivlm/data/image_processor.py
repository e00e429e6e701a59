"""Images into the tower's input: resize, InternVL's dynamic tiles, CLIP normalisation.

    PIL image ─► dynamic_tiles (a grid of tiles + a thumbnail, or the image alone) ─► resize each
    to S x S ─► (pixels / 255 - mean) / std ─► (tiles, 3, S, S)
The tower decides S and the normalisation its weights expect (`ImageProcessor.for_tower`); this
file decides how many tiles an image becomes, which the data pipeline needs before it loads a
single pixel (`num_tiles`, from the image's size alone).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ImageProcessor:
    """PIL image -> (tiles, 3, S, S) normalised tensor. One tile unless `max_tiles` > 1."""

    def __init__(self, image_size: int, mean, std, max_tiles: int = 1):
        self.image_size, self.max_tiles = image_size, max_tiles
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]

    @classmethod
    def for_tower(cls, tower) -> "ImageProcessor":
        """Matched to a models.vision.VisionTower (read, not imported: data never imports the
        model): its input size, its weights' normalisation, its tiling."""
        return cls(tower.config.image_size, tower.mean, tower.std, tower.config.max_tiles)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, S, S)
        return torch.from_numpy((array - self.mean) / self.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        tiles = dynamic_tiles(image, self.image_size, self.max_tiles)
        return torch.stack([self.to_tensor(tile) for tile in tiles])  # (n_tiles, 3, S, S)

    def num_tiles(self, size: tuple[int, int]) -> int:
        return num_tiles(*size, self.image_size, self.max_tiles)


def choose_grid(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """InternVL's grid choice: the (cols, rows) with at most `max_tiles` tiles whose aspect ratio
    is closest to the image's; on a tie, the larger grid if the image has the pixels for it."""
    aspect = width / height
    grids = sorted({(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if c * r <= max_tiles}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff or (diff == best_diff and
                                width * height > 0.5 * tile_size ** 2 * cols * rows):
            best, best_diff = (cols, rows), diff
    return best


def num_tiles(width: int, height: int, tile_size: int, max_tiles: int) -> int:
    """Tiles `dynamic_tiles` makes for an image of this size (thumbnail included)."""
    if max_tiles <= 1:
        return 1
    cols, rows = choose_grid(width, height, tile_size, max_tiles)
    return cols * rows + (1 if cols * rows > 1 else 0)


def dynamic_tiles(image: Image.Image, tile_size: int, max_tiles: int) -> list[Image.Image]:
    """InternVL's dynamic preprocessing: resize the image onto the chosen grid, cut it into
    tiles, and append a whole-image thumbnail so the model also sees the global layout."""
    if max_tiles <= 1:
        return [image]
    cols, rows = choose_grid(*image.size, tile_size, max_tiles)
    resized = image.resize((cols * tile_size, rows * tile_size), Image.BICUBIC)
    tiles = [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]  # row-major, as InternVL
    if len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.BICUBIC))
    return tiles
