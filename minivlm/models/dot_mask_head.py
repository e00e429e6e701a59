"""The simplest mask head a `[SEG]` token can drive: a dot product per pixel (`--seg-head dot`).

    [SEG] state (n, D) ─► text_hidden_fcs ─► query (n, C)
    patch tokens (n, P, Dv) ─► image_to_mask ─► (n, P, C·u·u) ─► pixel embeddings (n, C, u·g, u·g)
    mask logit at each pixel = query · pixel embedding / √C  ─► bilinear to each image's (H, W)
Each patch predicts a u×u block of pixel embeddings (u = 4, the upscaling of SAM's decoder), so
the mask is as fine as SAM's low-resolution output. It has no attention between prompt and image:
what to segment must already be in the query. A teaching baseline beside LISA's SAM-style decoder
(seg_head.py); same forward (the loss is seg_losses.mask_loss for both), same module
names for the parts that train.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F



class DotProductMaskHead(nn.Module):
    def __init__(self, *, lm_dim: int, vision_dim: int, grid_size: int, dim: int,
                 upscale: int = 4):
        super().__init__()
        self.text_hidden_fcs = nn.Sequential(nn.Linear(lm_dim, lm_dim), nn.ReLU(),
                                             nn.Linear(lm_dim, dim))
        self.image_to_mask = nn.Sequential(nn.LayerNorm(vision_dim),
                                           nn.Linear(vision_dim, dim * upscale * upscale))
        self.grid_size, self.dim, self.upscale = grid_size, dim, upscale

    def pixel_embeddings(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(n, P, Dv) patch tokens -> (n, C, u·g, u·g): each patch unfolds into a u×u block."""
        n, g, u, c = patch_tokens.shape[0], self.grid_size, self.upscale, self.dim
        x = self.image_to_mask(patch_tokens).view(n, g, g, c, u, u)  # (n, gy, gx, C, uy, ux)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * u, g * u)

    def forward(self, seg_hidden: torch.Tensor, patch_tokens: torch.Tensor,
                sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        query = self.text_hidden_fcs(seg_hidden)  # (n, C)
        pixels = self.pixel_embeddings(patch_tokens)  # (n, C, 4g, 4g)
        low_res = torch.einsum("nc,nchw->nhw", query, pixels) / math.sqrt(self.dim)
        return [F.interpolate(low_res[k][None, None].float(), size=tuple(size), mode="bilinear",
                              align_corners=False)[0, 0] for k, size in enumerate(sizes)]
