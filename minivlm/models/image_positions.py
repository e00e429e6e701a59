"""2-D positions for image tokens: a learned row and column embedding (`--image-positions 2d`).

The LM gives every token one 1-D RoPE position, so a tile's side×side image tokens reach it in
row-major order: "left of" and "above" are not directions it can read off the positions. The
tower's own position embeddings survive the projector only as a mix inside each feature. Here a
row embedding and a column embedding are added to each projected image token (as ViT's factorised
2-D position embeddings do), the cheap cousin of Qwen2-VL's M-RoPE, which instead rotates by
(time, row, column). Every tile and every image of a sample gets the same grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ImagePositions2D(nn.Module):
    def __init__(self, side: int, dim: int):
        super().__init__()
        # Zeros: the option starts as a no-op and learns only what the loss asks of it.
        self.row = nn.Parameter(torch.zeros(side, dim))
        self.col = nn.Parameter(torch.zeros(side, dim))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(N, side², D) image tokens of N tiles, row-major -> the same plus their positions."""
        side = self.row.shape[0]
        grid = self.row[:, None, :] + self.col[None, :, :]  # (side, side, D)
        return image_embeds + grid.reshape(side * side, -1).to(image_embeds.dtype)
