"""Segment Anything as released: image encoder + prompt encoder + mask decoder, end to end.

A hand-written copy of segment-anything's `modeling/sam.py` and `build_sam.py` (Kirillov et
al. 2023, "Segment Anything") on our own modules: `sam_image_encoder.ImageEncoderViT`,
`sam_prompt_encoder.PromptEncoder` and `mask_decoder.MaskDecoder`. Module and parameter names
are SAM's, so an original checkpoint (sam_vit_{b,l,h}_*.pth) loads as it is
(`sam_checkpoint.load_sam`).

    uint8 image ─► preprocess (resize longest side, normalise, pad to S x S)
        ─► image_encoder (N, 3, S, S) -> (N, C, S/16, S/16)
    points/boxes/masks ─► prompt_encoder ─► sparse (B, n, C), dense (B, C, S/16, S/16)
        ─► mask_decoder ─► low-res mask logits (B, M, S/4, S/4), IoU estimates (B, M)
        ─► postprocess_masks (upsample, crop the padding, resize to the original image)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from minivlm.models.mask_decoder import MaskDecoder, MaskDecoderConfig, build_mask_decoder
from minivlm.models.sam_image_encoder import ImageEncoderViT
from minivlm.models.sam_prompt_encoder import PromptEncoder
from minivlm.models.sam_transforms import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    normalize_and_pad,
    postprocess_masks,
    resize_longest_side,
)


@dataclass(frozen=True)
class SamEncoderConfig:
    """Sizes of SAM's ViT image encoder; defaults are a tiny CPU encoder (8 x 8 grid)."""

    img_size: int = 64  # the square input the encoder runs at (SAM: 1024)
    patch_size: int = 8
    in_chans: int = 3
    embed_dim: int = 32
    depth: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0
    window_size: int = 3  # windowed blocks attend inside ws x ws windows; 0: all blocks global
    global_attn_indexes: tuple[int, ...] = (1,)
    out_chans: int = 64  # the neck's width = the prompt encoder's and mask decoder's width
    layer_norm_eps: float = 1e-6  # build_sam.py: partial(nn.LayerNorm, eps=1e-6)


def _release(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: tuple[int, ...]):
    """A released encoder: 1024 px, 16 px patches, 14 x 14 windows, 256-channel neck."""
    return SamEncoderConfig(
        img_size=1024, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        window_size=14, global_attn_indexes=global_attn_indexes, out_chans=256,
    )


# segment_anything/build_sam.py: build_sam_vit_b / _l / _h.
SAM_ENCODER_PRESETS: dict[str, SamEncoderConfig] = {
    "vit_b": _release(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _release(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _release(1280, 32, 16, (7, 15, 23, 31)),
}


@dataclass(frozen=True)
class SamConfig:
    """A whole SAM; the encoder's out_chans must equal the decoder's transformer_dim."""

    encoder: SamEncoderConfig = field(default_factory=SamEncoderConfig)
    decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    mask_in_chans: int = 16  # hidden channels of the mask-prompt downscaler (SAM: 16)


class Sam(nn.Module):
    mask_threshold: float = 0.0  # a mask logit above it is foreground
    image_format: str = "RGB"

    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, ...] = SAM_PIXEL_MEAN,
        pixel_std: tuple[float, ...] = SAM_PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not persistent: SAM's checkpoints do not store them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, image: np.ndarray | Tensor) -> tuple[Tensor, tuple[int, int]]:
        """uint8 (H, W, 3) RGB image -> encoder input (3, S, S) and the resized size (h, w).

        Resized so its longest side is the encoder's img_size S (SAM's ResizeLongestSide),
        normalised and padded bottom/right to S x S. (h, w) is `postprocess_masks`'s input_size.
        """
        resized = resize_longest_side(image, self.image_encoder.img_size).to(self.device)
        return self.normalize_and_pad(resized), (resized.shape[-2], resized.shape[-1])

    def normalize_and_pad(self, x: Tensor) -> Tensor:
        """Resized (..., 3, h, w) pixels, 0..255 -> normalised (..., 3, S, S) (SAM's preprocess)."""
        return normalize_and_pad(x, self.image_encoder.img_size, self.pixel_mean, self.pixel_std)

    def postprocess_masks(
        self, masks: Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> Tensor:
        """Low-res mask logits (B, M, S/4, S/4) -> (B, M, H, W) logits on the original image."""
        return postprocess_masks(
            masks, self.image_encoder.img_size, tuple(original_size), tuple(input_size)
        )

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, Tensor]]:
        """SAM's end-to-end prediction, with segment-anything's `Sam.forward` contract.

        Each record: 'image' (3, h, w) already resized (`resize_longest_side`), 'original_size'
        (H, W), and optionally 'point_coords' (B, N, 2) with 'point_labels' (B, N), 'boxes'
        (B, 4) -- both in the resized frame (`apply_coords` / `apply_boxes`) -- and
        'mask_inputs' (B, 1, S/4, S/4). Returns per record 'masks' (B, M, H, W) booleans,
        'iou_predictions' (B, M) and 'low_res_logits' (B, M, S/4, S/4).
        """
        images = torch.stack([self.normalize_and_pad(r["image"]) for r in batched_input])
        image_embeddings = self.image_encoder(images)  # (N, C, S/16, S/16)
        image_pe = self.prompt_encoder.get_dense_pe()  # (1, C, S/16, S/16)
        outputs = []
        for record, embedding in zip(batched_input, image_embeddings):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res_masks, iou_predictions = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res_masks, record["image"].shape[-2:], record["original_size"]
            )
            outputs.append({
                "masks": masks > self.mask_threshold,
                "iou_predictions": iou_predictions,
                "low_res_logits": low_res_masks,
            })
        return outputs


def build_sam_image_encoder(config: SamEncoderConfig) -> ImageEncoderViT:
    """A randomly initialised encoder, built as segment-anything's `_build_sam` builds it."""
    return ImageEncoderViT(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        out_chans=config.out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=config.window_size,
        global_attn_indexes=config.global_attn_indexes,
    )


def build_sam_parts(config: SamConfig) -> dict[str, nn.Module]:
    """The three sub-modules of `Sam`, by keyword (`Sam(**parts)`), randomly initialised."""
    encoder = config.encoder
    if encoder.out_chans != config.decoder.transformer_dim:
        raise ValueError(
            f"SamConfig: encoder out_chans={encoder.out_chans} must equal the decoder's "
            f"transformer_dim={config.decoder.transformer_dim}"
        )
    grid = encoder.img_size // encoder.patch_size
    prompt_encoder = PromptEncoder(
        embed_dim=config.decoder.transformer_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(encoder.img_size, encoder.img_size),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder, _ = build_mask_decoder(config.decoder)  # its NoMaskPromptEncoder is not used
    return {
        "image_encoder": build_sam_image_encoder(encoder),
        "prompt_encoder": prompt_encoder,
        "mask_decoder": mask_decoder,
    }


def build_sam(config: SamConfig) -> Sam:
    """A randomly initialised SAM (segment-anything's `_build_sam` without a checkpoint)."""
    return Sam(**build_sam_parts(config)).eval()
