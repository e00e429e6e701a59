"""The bridge from vision tokens (B, P, Dv) to language-model embeddings (B, P', D).

Two classic choices:
- "mlp": LLaVA-1.5's two-layer MLP, one LM token per patch (P' = P).
- "pixel_shuffle": InternVL/nanoVLM's space-to-depth, merging each `merge x merge` block of
  neighbouring patches into one token (P' = P / merge^2), then an MLP. Fewer tokens means shorter
  sequences, which is most of the cost of a VLM on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class ProjectorConfig:
    kind: str = "pixel_shuffle"  # "mlp" | "pixel_shuffle"
    merge: int = 2  # pixel_shuffle: side of the merged block of patches


class MLPProjector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, lm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(lm_dim, lm_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


def pixel_shuffle(tokens: torch.Tensor, merge: int) -> torch.Tensor:
    """(B, P, C) on a square grid -> (B, P / merge^2, C * merge^2), neighbours concatenated."""
    B, P, C = tokens.shape
    side = int(P ** 0.5)
    if side * side != P or side % merge:
        raise ValueError(f"pixel_shuffle: {P} patches is not a square grid divisible by {merge}")
    x = tokens.view(B, side // merge, merge, side // merge, merge, C)  # (B, h, m, w, m, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h, w, m, m, C)
    return x.reshape(B, (side // merge) ** 2, merge * merge * C)  # (B, P', m*m*C)


class PixelShuffleProjector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, merge: int):
        super().__init__()
        self.merge = merge
        merged_dim = vision_dim * merge * merge
        # InternVL's mlp1: LayerNorm over the merged features, then a two-layer MLP.
        self.norm = nn.LayerNorm(merged_dim)
        self.mlp = MLPProjector(merged_dim, lm_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(pixel_shuffle(tokens, self.merge)))


def build_projector(config: ProjectorConfig, vision_dim: int, lm_dim: int) -> nn.Module:
    if config.kind == "mlp":
        return MLPProjector(vision_dim, lm_dim)
    if config.kind == "pixel_shuffle":
        return PixelShuffleProjector(vision_dim, lm_dim, config.merge)
    raise ValueError(f"ProjectorConfig.kind={config.kind!r}: expected 'mlp' or 'pixel_shuffle'")


def tokens_per_tile(config: ProjectorConfig, num_patches: int) -> int:
    return num_patches if config.kind == "mlp" else num_patches // config.merge ** 2
