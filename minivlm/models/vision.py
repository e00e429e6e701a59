"""The image side: an open_clip ViT that turns pixels into per-patch tokens.

The VLM uses every patch token (B, P, Dv), not only CLIP's pooled embedding: the language model
needs to know *where* things are. The tower is built by models/build.py (open_clip's model, with
or without its pretrained weights); turning a PIL image into normalised tiles is data's job
(data/images.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from minivlm.ranges import at_least, check_ranges, one_of

# CLIP's normalisation (OpenAI); named open_clip models bring their own.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """Defaults build a tiny ViT for a laptop CPU; set `model_name` to any open_clip model."""

    model_name: str = "tiny"  # "tiny", or an open_clip name such as "ViT-B-16"
    pretrained: str = ""  # open_clip tag ("openai") or a local weights file; "" = random init
    image_size: int = field(default=32, metadata=at_least(1))
    patch_size: int = field(default=4, metadata=at_least(1))
    width: int = field(default=128, metadata=at_least(1))
    layers: int = field(default=3, metadata=at_least(1))
    head_width: int = field(default=32, metadata=at_least(1))
    freeze: bool = False  # never trained, whatever --train says (train/trainable.py decides)
    # "patch": the ViT's one strided convolution; "conv": a stem of 3x3 convolutions
    # (conv_stem.py), which sees shapes' edges before the first attention layer
    stem: str = field(default="patch", metadata=one_of("patch", "conv"))
    # > 1: dynamic tiling (InternVL), plus a thumbnail when tiled
    max_tiles: int = field(default=1, metadata=at_least(1))

    def __post_init__(self):
        check_ranges(self)
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"--vision-stem conv halves the image per layer: --vision-patch-size "
                             f"must be a power of two >= 2, got {self.patch_size}")
        if self.stem == "conv" and self.pretrained:
            raise ValueError("--vision-stem conv replaces the patch embedding, which "
                             "--vision-pretrained would have loaded; use one of them")


class VisionTower(nn.Module):
    """open_clip's image tower, returning its patch tokens. `config` is the resolved one (a named
    open_clip model's own image/patch size and width); `mean`/`std` are the normalisation its
    weights expect, which the image processor applies."""

    def __init__(self, config: VisionConfig, *, visual: nn.Module, mean, std):
        super().__init__()
        self.config = config
        # Only the image tower is kept; the text tower is CLIP's and the VLM has its own LM.
        self.visual = visual
        self.mean, self.std = tuple(mean), tuple(std)
        self.grid_size = config.image_size // config.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, P, Dv) patch tokens (after CLIP's ln_post)."""
        _, tokens = self.visual(pixel_values)
        return tokens
