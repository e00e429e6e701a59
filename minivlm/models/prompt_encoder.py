"""The two pieces of SAM's PromptEncoder that LISA uses.

LISA ("LISA: Reasoning Segmentation via Large Language Model", Lai et al. 2024) prompts SAM's
mask decoder with no points, boxes or masks: its only sparse prompt is the projected hidden
state of the `[SEG]` token. What it still needs from SAM's `modeling/prompt_encoder.py` is
  - `pe_layer`: random Fourier positional encodings of the image grid (`get_dense_pe`), and
  - `no_mask_embed`: the learned dense embedding SAM adds to every image position when no
    mask prompt is given.
Names match SAM's, so a checkpoint's `prompt_encoder.pe_layer.*` and
`prompt_encoder.no_mask_embed.weight` load onto `NoMaskPromptEncoder` by stripping the prefix.
SAM's full prompt encoder (points, boxes, masks) is `sam_prompt_encoder.PromptEncoder`, built on
the same `PositionEmbeddingRandom`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al. 2020, Fourier features).

    A fixed Gaussian matrix maps (x, y) in [-1, 1]^2 to `num_pos_feats` frequencies; the
    encoding is [sin, cos] of them, so the output has 2 * num_pos_feats channels.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0  # SAM's fallback
        # A buffer, not a parameter: SAM never trains it, but checkpoints store it.
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        """coords (..., 2) in [0, 1] -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1  # [0, 1] -> [-1, 1]
        coords = coords @ self.positional_encoding_gaussian_matrix  # (..., 2) @ (2, F) -> (..., F)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)  # (..., 2F)

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Encoding of every cell centre of an (H, W) grid -> (C, H, W), C = 2 * num_pos_feats."""
        height, width = size
        device = self.positional_encoding_gaussian_matrix.device
        # Cell centres (i + 0.5) / H, as SAM computes them with cumsum over a grid of ones.
        y_embed = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height  # (H,)
        x_embed = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width  # (W,)
        coords = torch.stack(
            [x_embed[None, :].expand(height, width), y_embed[:, None].expand(height, width)], dim=-1
        )  # (H, W, 2), x first as in SAM
        return self._pe_encoding(coords).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)

    def forward_with_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Encoding of pixel coordinates (B, N, 2), (x, y) in an (H, W) image -> (B, N, C).

        SAM's point and box-corner prompts; x is divided by the width, y by the height.
        """
        height, width = image_size
        scale = coords.new_tensor([width, height], dtype=torch.float32)  # (2,)
        return self._pe_encoding(coords.to(torch.float32) / scale)


class NoMaskPromptEncoder(nn.Module):
    """SAM's prompt encoder reduced to what a text-prompted decoder needs.

    The sparse prompt (LISA: `text_hidden_fcs([SEG] hidden state)`, shape (B, N, C)) goes to
    the mask decoder as it is; this module supplies the dense prompt and the image PE.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        # SAM encodes positions with embed_dim // 2 frequencies -> embed_dim channels (sin, cos).
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self, grid_size: tuple[int, int]) -> Tensor:
        """Positional encoding of the image-embedding grid -> (1, C, H, W), SAM's `image_pe`."""
        return self.pe_layer(grid_size).unsqueeze(0)

    def forward(self, batch_size: int, grid_size: tuple[int, int]) -> Tensor:
        """The dense prompt for `batch_size` prompts without a mask input -> (B, C, H, W).

        An expanded view (no copy), exactly SAM's `dense_embeddings` when `masks is None`.
        """
        height, width = grid_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, height, width)
