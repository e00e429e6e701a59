"""SAM's full prompt encoder: points, boxes and masks -> sparse and dense prompt embeddings.

A hand-written copy of segment-anything's `modeling/prompt_encoder.py` (Kirillov et al. 2023,
"Segment Anything", §3 "Prompt encoder") with the same constructor arguments, parameter names
and `forward`, so `PromptEncoder.load_state_dict(sam.prompt_encoder.state_dict())` works as it
is. LISA needs only two of its pieces (`prompt_encoder.NoMaskPromptEncoder`); this is the whole
of it, for SAM prompted as released.

  - sparse: each point (x, y) is its Fourier encoding plus a learned embedding of its label
    (0 background, 1 foreground, -1 padding); a box is its two corners, each with its own
    learned embedding. Output (B, N, C).
  - dense: a (B, 1, 4h, 4w) mask is downscaled 4x by two stride-2 convs to (B, C, h, w); with
    no mask, one learned `no_mask_embed` fills every position.

It lives apart from `prompt_encoder.py` because it needs `LayerNorm2d` from `mask_decoder.py`,
which itself imports `prompt_encoder.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minivlm.models.mask_decoder import LayerNorm2d
from minivlm.models.prompt_encoder import PositionEmbeddingRandom


class PromptEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size  # the padded encoder input (H, W), e.g. 1024
        self.image_embedding_size = image_embedding_size  # its grid (h, w), e.g. 64
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # Learned type embeddings: 0 negative point, 1 positive point, 2 / 3 a box's top-left /
        # bottom-right corner.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        """The positional encoding of the embedding grid -> (1, C, h, w), the decoder's image_pe."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """points (B, N, 2) in input pixels, labels (B, N) -> (B, N [+1], C)."""
        points = points + 0.5  # the centre of the pixel
        if pad:
            # Without a box SAM appends one "not a point", so the decoder sees the same number of
            # sparse tokens as with one (two corners) -- SAM's training format.
            padding_point = torch.zeros((points.shape[0], 1, 2), device=points.device)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device)
            points = torch.cat([points, padding_point], dim=1)  # (B, N+1, 2)
            labels = torch.cat([labels, padding_label], dim=1)  # (B, N+1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)  # (B, N, C)
        labels = labels.unsqueeze(-1)  # (B, N, 1)
        # A padding point carries no position, only its embedding; the others add their label's.
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        embedding = torch.where(labels == 0, embedding + self.point_embeddings[0].weight, embedding)
        return torch.where(labels == 1, embedding + self.point_embeddings[1].weight, embedding)

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        """boxes (B, 4) as (x0, y0, x1, y1) in input pixels -> (B, 2, C), one token per corner."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # (B, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)  # (B, 2, C)
        corner_types = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return embedding + corner_types  # (B, 2, C) + (2, C)

    def _get_batch_size(
        self, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, masks: Tensor | None
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _get_device(self) -> torch.device:
        return self.point_embeddings[0].weight.device

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        masks: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Sparse (B, N, C) and dense (B, C, h, w) embeddings of B prompts.

        points: (coords (B, N, 2), labels (B, N)); boxes (B, 4); masks (B, 1, 4h, 4w) logits.
        Coordinates are in the resized, unpadded encoder input (`sam_transforms.apply_coords`).
        """
        batch = self._get_batch_size(points, boxes, masks)
        sparse = torch.empty((batch, 0, self.embed_dim), device=self._get_device())
        if points is not None:
            coords, labels = points
            point_embeddings = self._embed_points(coords, labels, pad=boxes is None)
            sparse = torch.cat([sparse, point_embeddings], dim=1)  # (B, N, C)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)  # (B, N + 2, C)

        if masks is not None:
            dense = self.mask_downscaling(masks)  # (B, 1, 4h, 4w) -> (B, C, h, w)
        else:
            height, width = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
        return sparse, dense
