"""The image side: an open_clip ViT that turns pixels into per-patch tokens, and its preprocessing.

The VLM uses every patch token (B, P, Dv), not only CLIP's pooled embedding: the language model
needs to know *where* things are. Large or odd-aspect images can be cut into InternVL-style
dynamic tiles (plus a thumbnail), each tile encoded like an image of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

# CLIP's normalisation (OpenAI); named open_clip models bring their own.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """Defaults build a tiny ViT for a laptop CPU; set `model_name` to any open_clip model."""

    model_name: str = "tiny"  # "tiny", or an open_clip name such as "ViT-B-16"
    pretrained: str = ""  # open_clip tag ("openai") or a local weights file; "" = random init
    image_size: int = 32
    patch_size: int = 4
    width: int = 128
    layers: int = 3
    head_width: int = 32
    freeze: bool = False
    max_tiles: int = 1  # > 1: dynamic tiling (InternVL), plus a thumbnail when tiled


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        import open_clip  # imported here: it pulls in torchvision, slow to import

        self.config = config
        if config.model_name == "tiny":
            clip = open_clip.CLIP(
                embed_dim=config.width,
                vision_cfg=dict(image_size=config.image_size, patch_size=config.patch_size,
                                width=config.width, layers=config.layers,
                                head_width=config.head_width, output_tokens=True),
                text_cfg=dict(context_length=4, vocab_size=8, width=32, heads=1, layers=1),
            )
            mean, std = CLIP_MEAN, CLIP_STD
        else:
            clip = open_clip.create_model(config.model_name, pretrained=config.pretrained or None)
            preprocess = getattr(clip.visual, "preprocess_cfg", None) or {}
            mean, std = preprocess.get("mean", CLIP_MEAN), preprocess.get("std", CLIP_STD)
            config.image_size = clip.visual.image_size[0]
            config.patch_size = clip.visual.patch_size[0]
            config.width = clip.visual.transformer.width
        # Only the image tower is kept; the text tower is CLIP's and the VLM has its own LM.
        self.visual = clip.visual
        self.visual.output_tokens = True
        self.mean, self.std = tuple(mean), tuple(std)
        self.grid_size = config.image_size // config.patch_size
        if config.freeze:
            self.requires_grad_(False)

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, P, Dv) patch tokens (after CLIP's ln_post)."""
        _, tokens = self.visual(pixel_values)
        return tokens


class ImageProcessor:
    """PIL image -> (tiles, 3, S, S) normalised tensor. One tile unless `max_tiles` > 1."""

    def __init__(self, image_size: int, mean, std, max_tiles: int = 1):
        self.image_size, self.max_tiles = image_size, max_tiles
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]

    @classmethod
    def for_tower(cls, tower: VisionTower) -> "ImageProcessor":
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
