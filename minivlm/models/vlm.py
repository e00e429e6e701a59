"""The vision-language model: CLIP patch tokens, a projector, and the Transformer, joined (LLaVA).

The tokenizer writes one `<image>` id per image placeholder; the data pipeline (data/batch.py)
repeats that id once per image-token row, so a sequence already has the right length. Here each of
those positions gets its row of projected image features instead of the `<image>` embedding:
    text ids (B, T) ─► embed_tokens ─► (B, T, D) ─┐
    pixels (N, 3, S, S) ─► VisionTower ─► (N, P, Dv) ─► projector ─► (N, P', D) ─► rows spliced in
With segmentation enabled, the hidden state that predicts each `[SEG]` prompts a SAM-style mask
decoder (LISA): see seg_head.py.

The projector is the bridge from vision tokens (N, P, Dv) to LM embeddings (N, P', D), in two
classic forms:
- "mlp": LLaVA-1.5's two-layer MLP, one LM token per patch (P' = P).
- "pixel_shuffle": InternVL/nanoVLM's space-to-depth, merging each `merge x merge` block of
  neighbouring patches into one token (P' = P / merge^2), then an MLP. Fewer tokens means shorter
  sequences, which is most of the cost of a VLM on a CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivlm.constants import IGNORE_INDEX
from minivlm.models.attention_mask import ImageTokensConfig, lm_attention, use_flex_attention
from minivlm.models.generation import decode_steps
from minivlm.models.image_positions import ImagePositions2D
from minivlm.models.seg_head import SegConfig, SegHead
from minivlm.models.seg_losses import mask_loss
from minivlm.models.transformer import Transformer, TransformerConfig
from minivlm.models.vision import VisionConfig, VisionTower
from minivlm.ranges import at_least, check_ranges


@dataclass
class ProjectorConfig:
    kind: str = "pixel_shuffle"  # "mlp" | "pixel_shuffle"
    merge: int = field(default=2, metadata=at_least(1))  # pixel_shuffle: side of a merged block

    def __post_init__(self):
        check_ranges(self)


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


@dataclass
class VLMConfig:
    """Every sub-config of the model; saved as config.json in each checkpoint. A built model's
    config is the resolved one (models/build.py): sizes a named open_clip model or a SAM
    checkpoint fixes are filled in, so the saved file alone rebuilds the model."""

    lm: TransformerConfig = field(default_factory=TransformerConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    image_tokens: ImageTokensConfig = field(default_factory=ImageTokensConfig)
    image_token_id: int = -1  # set from the tokenizer
    seg_token_id: int = -1

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lm"] = self.lm.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        return cls(lm=TransformerConfig(**d["lm"]), vision=VisionConfig(**d["vision"]),
                   projector=ProjectorConfig(**d["projector"]), seg=SegConfig(**d["seg"]),
                   # absent from config.json files saved before the option existed
                   image_tokens=ImageTokensConfig(**d.get("image_tokens", {})),
                   image_token_id=d["image_token_id"], seg_token_id=d["seg_token_id"])


@dataclass
class VLMOutput:
    loss: torch.Tensor
    ce_loss: torch.Tensor
    mask_bce: torch.Tensor | None = None
    mask_dice: torch.Tensor | None = None
    num_label_tokens: int = 0


class VLM(nn.Module):
    """The parts come built (models/build.py), as segment-anything's Sam takes its encoder and
    decoder; `config` describes them and is never written here."""

    def __init__(self, config: VLMConfig, *, vision: VisionTower, projector: nn.Module,
                 lm: Transformer, seg_head: SegHead | None = None,
                 image_positions: ImagePositions2D | None = None):
        super().__init__()
        self.config = config
        # Registration order is parameter order, which a saved optimizer state is indexed by.
        self.vision = vision
        self.lm = lm
        self.projector = projector
        self.seg_head = seg_head
        self.image_positions = image_positions  # --image-positions 2d

    @property
    def image_tokens_per_tile(self) -> int:
        return tokens_per_tile(self.config.projector, self.vision.num_patches)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        """Token embeddings with image features spliced in; also returns the patch tokens.
        `pixel_values` is (N, 3, S, S) pixels, or (N, P, Dv) patch tokens already computed by a
        frozen tower (ChatDataset's feature cache)."""
        embeds = self.lm.embed_tokens(input_ids)  # (B, T, D)
        is_image = input_ids == self.config.image_token_id  # (B, T)
        if pixel_values is None or pixel_values.numel() == 0:
            if bool(is_image.any()):
                raise ValueError("input has <image> tokens but no pixel_values were given")
            return embeds, None
        if pixel_values.dim() == 3:  # (N, P, Dv): patch tokens cached from a frozen tower
            patch_tokens = pixel_values.to(embeds.dtype)
        else:
            patch_tokens = self.vision(pixel_values.to(embeds.dtype))  # (N, P, Dv)
        image_embeds = self.projector(patch_tokens)  # (N, P', D)
        if self.image_positions is not None:
            image_embeds = self.image_positions(image_embeds)
        image_rows = image_embeds.reshape(-1, image_embeds.shape[-1])  # (N*P', D)
        if int(is_image.sum()) != image_rows.shape[0]:
            raise ValueError(f"{int(is_image.sum())} <image> token positions but the images give "
                             f"{image_rows.shape[0]} rows ({image_embeds.shape[0]} tiles x "
                             f"{image_embeds.shape[1]} tokens)")
        # masked_scatter fills positions in row-major order: sample by sample, image by image.
        embeds = embeds.masked_scatter(is_image[..., None], image_rows.to(embeds.dtype))
        return embeds, patch_tokens

    def lm_mask(self, input_ids, attention_mask, document_ids=None, flex=False):
        """(mask, position_ids) the LM attends with (attention_mask.py): the padding mask itself
        by default; a ready (B, 1, T, T) mask for packed rows (`document_ids`, data/packing.py)
        or bidirectional image tokens, as a FlexAttention BlockMask with `flex`."""
        return lm_attention(input_ids, attention_mask, self.config.image_token_id,
                            self.config.image_tokens.attention, document_ids, flex)

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, masks=None,
                seg_tile_index=None, document_ids=None, seg_images=None) -> VLMOutput:
        """`document_ids` (B, T): a packed batch's sample number (1..N over the batch) of each
        token, 0 = padding; then `seg_tile_index` has one entry per sample, not per row.
        `seg_images`: with SAM's image encoder, the masks' images (its embeddings, or its
        preprocessed pixels); `seg_tile_index` then points into them (data/batch.py)."""
        embeds, patch_tokens = self.embed(input_ids, pixel_values)
        # Packed rows on CUDA: FlexAttention skips the cross-sample blocks (attention_mask.py).
        flex = document_ids is not None and use_flex_attention(input_ids.device)
        mask, positions = self.lm_mask(input_ids, attention_mask, document_ids, flex)
        hidden = self.lm.hidden_states(inputs_embeds=embeds, attention_mask=mask,
                                       position_ids=positions)
        # Next-token prediction: the hidden state at t predicts the label at t + 1. Only positions
        # with a label go through lm_head (images and prompts carry none).
        targets = labels[:, 1:]  # (B, T-1)
        has_label = targets != IGNORE_INDEX
        logits = self.lm.lm_head(hidden[:, :-1][has_label])  # (n_labels, V)
        ce = F.cross_entropy(logits.float(), targets[has_label])
        weight = self.config.seg.ce_weight if self.seg_head is not None else 1.0
        out = VLMOutput(loss=weight * ce, ce_loss=ce.detach(),
                        num_label_tokens=int(has_label.sum()))
        if self.seg_head is not None and masks:
            rows, cols = self.seg_positions(input_ids)
            if len(rows) != len(masks):
                raise ValueError(f"{len(rows)} [SEG] tokens but {len(masks)} masks")
            samples = rows if document_ids is None else document_ids[rows, cols] - 1
            images = self.seg_image_features(patch_tokens, seg_images)
            predicted = self.seg_head(hidden[rows, cols], images[seg_tile_index[samples]],
                                      [m.shape for m in masks])
            c = self.config.seg
            weighted, bce, dice = mask_loss(predicted, masks, bce_weight=c.bce_weight,
                                            dice_weight=c.dice_weight)
            out.loss = out.loss + weighted
            out.mask_bce, out.mask_dice = bce.detach(), dice.detach()
        return out

    def seg_image_features(self, patch_tokens, seg_images) -> torch.Tensor:
        """What the seg head reads of the images: the tower's patch tokens (N_tiles, P, Dv), or,
        with SAM's image encoder, its embeddings of the masks' images (N_seg, C, g, g)."""
        if getattr(self.seg_head, "image_encoder", None) is None:
            return patch_tokens
        if seg_images is None:
            raise ValueError("the seg head reads SAM's image encoder (--seg-image-encoder sam): "
                             "the batch needs seg_images (data/batch.py)")
        return self.seg_head.image_embeddings(seg_images)

    def seg_positions(self, input_ids: torch.Tensor):
        """(batch, position) of the hidden state that prompts the mask of each [SEG] token. By
        default the state that *predicts* [SEG], as LISA does (its seg_token_mask is
        input_ids[:, 1:] == [SEG]): at generation time that is exactly the state in hand when the
        model decides to emit [SEG]. With `seg.prompt == "seg_token"`, the [SEG] token's own
        output state: one more token of context, read back once [SEG] has been generated."""
        if self.config.seg.prompt == "seg_token":
            return (input_ids == self.config.seg_token_id).nonzero(as_tuple=True)
        is_seg = input_ids[:, 1:] == self.config.seg_token_id  # (B, T-1)
        return is_seg.nonzero(as_tuple=True)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, **generate_kwargs):
        """Prefill text + image embeddings through `inputs_embeds`, then KV-cache decoding."""
        embeds, _ = self.embed(input_ids, pixel_values)
        prompt_mask, _ = self.lm_mask(input_ids, attention_mask)
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                prompt_mask=prompt_mask, **generate_kwargs)

    @torch.no_grad()
    def generate_steps(self, input_ids, attention_mask, pixel_values=None, **generate_kwargs):
        """As `generate`, but yields each step's new tokens (B,) as they come (streaming)."""
        embeds, _ = self.embed(input_ids, pixel_values)
        prompt_mask, _ = self.lm_mask(input_ids, attention_mask)
        yield from decode_steps(self.lm, inputs_embeds=embeds, attention_mask=attention_mask,
                                prompt_mask=prompt_mask, **generate_kwargs)

    @torch.no_grad()
    def predict_masks(self, input_ids, attention_mask, pixel_values, seg_tile_index,
                      image_sizes, seg_images=None) -> list[torch.Tensor]:
        """Mask logits for each [SEG] in `input_ids` (prompt + generated answer), one (H, W) per
        [SEG] at its image's size. `seg_tile_index[b]` names the tile sample b is segmented on
        (in `seg_images`, SAM's preprocessed images, with SAM's image encoder)."""
        if self.seg_head is None:
            raise ValueError("this model has no segmentation head (seg.enabled is false)")
        embeds, patch_tokens = self.embed(input_ids, pixel_values)
        mask, positions = self.lm_mask(input_ids, attention_mask)
        hidden = self.lm.hidden_states(inputs_embeds=embeds, attention_mask=mask,
                                       position_ids=positions)
        rows, cols = self.seg_positions(input_ids)
        if len(rows) == 0:
            return []
        images = self.seg_image_features(patch_tokens, seg_images)[seg_tile_index[rows]]
        return self.seg_head(hidden[rows, cols], images, [image_sizes[r] for r in rows.tolist()])
