"""A convolutional stem in place of the ViT's patch embedding (`--vision-stem conv`).

A ViT cuts the image into p x p patches with one strided convolution, so everything inside a
patch is mixed by a single linear map. Xiao et al. 2021, "Early Convolutions Help Transformers
See Better", replace it with a few 3x3 stride-2 convolutions and a final 1x1: the same output grid
and width, but local edges and corners are built up before the first attention layer; the ViT then
trains faster and is less sensitive to its optimiser settings. At 32 px a shape is 2-3 patches
wide, so its kind (circle, square, triangle) lives in such edges.

    (N, 3, H, W) -> [3x3 conv stride 2 -> GELU] x log2(p) -> 1x1 conv -> (N, width, H/p, W/p)

The paper puts BatchNorm after each 3x3; batches here are small and mix a few images per
step, so the stem has none (a GELU only, as the ViT's own blocks use).
It is swapped in for open_clip's `visual.conv1` by the builder (models/build.py), as gpt-fast
swaps layers on a built model: open_clip's ViT does not know it is there.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ConvStem(nn.Module):
    def __init__(self, patch_size: int, width: int, in_channels: int = 3):
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"--vision-stem conv halves the image per layer: the patch size "
                             f"must be a power of two >= 2, got {patch_size}")
        num_layers = patch_size.bit_length() - 1  # log2(patch_size) stride-2 convolutions
        layers, channels = [], in_channels
        for k in range(num_layers):
            # channels double per layer and the last 3x3 has width / 2; the 1x1 then widens
            # to the ViT's width (the paper's stem: 3x3 layers of rising width, then a 1x1)
            out = max(8, width >> (num_layers - k))
            layers += [nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, width, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)  # (N, width, H / p, W / p), as the patch convolution's
