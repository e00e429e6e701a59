"""LISA's segmentation head: the `[SEG]` hidden state prompts a SAM-style mask decoder.

    hidden state predicting [SEG] (n, D) ─► text_hidden_fcs ─► sparse prompt (n, 1, C)
    the image's patch tokens (n, P, Dv) ─► image_to_mask ─► image_embeddings (n, C, g, g)
    random-Fourier image_pe (1, C, g, g), learned no-mask dense prompt (n, C, g, g)
        ─► MaskDecoder ─► (n, 1, 4g, 4g) mask logits ─► bilinear to each image's (H, W)
By default the image input is the VLM's own vision tower (its patch grid, projected to the
decoder width), so the whole model trains on a CPU. LISA feeds SAM's own frozen ViT image
embeddings instead (`--seg-image-encoder sam`, sam_image_encoder.py): the image is resized and
padded as SAM does (sam_transforms.py), its embeddings (n, C, S/16, S/16) go to the decoder as
they are, and the masks come back through SAM's postprocessing (crop the padding, resize).
The embeddings are usually computed once per image, before training (data/feature_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivlm.models.mask_decoder import MaskDecoder, MaskDecoderConfig
from minivlm.models.prompt_encoder import NoMaskPromptEncoder
from minivlm.models.sam_image_encoder import ImageEncoderViT
from minivlm.models.sam_transforms import postprocess_masks
from minivlm.ranges import at_least, check_ranges, one_of


# The decoder's sizes are MaskDecoderConfig's (their one owner, defaults included); SegConfig
# carries them as flags under these names, and the two convert only through this table.
DECODER_FIELDS = {"decoder_dim": "transformer_dim", "decoder_depth": "depth",
                  "decoder_heads": "num_heads", "decoder_mlp_dim": "mlp_dim",
                  "iou_head_hidden_dim": "iou_head_hidden_dim"}
_DECODER = MaskDecoderConfig()


@dataclass
class SegConfig:
    enabled: bool = False
    decoder_dim: int = field(default=_DECODER.transformer_dim, metadata=at_least(1))
    decoder_depth: int = field(default=_DECODER.depth, metadata=at_least(1))
    decoder_heads: int = field(default=_DECODER.num_heads, metadata=at_least(1))
    decoder_mlp_dim: int = field(default=_DECODER.mlp_dim, metadata=at_least(1))
    iou_head_hidden_dim: int = field(default=_DECODER.iou_head_hidden_dim, metadata=at_least(1))
    sam_checkpoint: str = ""  # an original SAM .pth: its decoder is loaded, decoder_* become SAM's
    # what the decoder sees of the image: "tower" = the VLM's patch tokens, projected; "sam" =
    # SAM's own ViT encoder from --seg-sam-checkpoint, frozen (LISA)
    image_encoder: str = field(default="tower", metadata=one_of("tower", "sam"))
    # the SAM encoder's sizes, read from the checkpoint's shapes (build.py), so that config.json
    # rebuilds it without the file; {} with the tower
    sam_encoder: dict = field(default_factory=dict)
    # "sam": LISA's SAM-style decoder; "dot": a per-pixel dot product (dot_mask_head.py), a baseline
    head: str = field(default="sam", metadata=one_of("sam", "dot"))
    # which hidden state prompts the head: "predicting" = the one that predicts [SEG] (LISA's
    # seg_token_mask), "seg_token" = the output state at the [SEG] token itself
    prompt: str = field(default="predicting", metadata=one_of("predicting", "seg_token"))
    # SAM's dense-prompt slot (a mask prompt in SAM; LISA leaves it at "no mask"): "similarity"
    # fills it with where the [SEG] query matches each image embedding (SimilarityPrompt)
    dense_prompt: str = field(default="none", metadata=one_of("none", "similarity"))
    # LISA's loss weights; 0 turns a term off
    ce_weight: float = field(default=1.0, metadata=at_least(0))
    bce_weight: float = field(default=2.0, metadata=at_least(0))
    dice_weight: float = field(default=0.5, metadata=at_least(0))

    def __post_init__(self):
        check_ranges(self)
        if self.head == "dot" and (self.dense_prompt != "none" or self.sam_checkpoint):
            raise ValueError("--seg-head dot has no SAM decoder: it takes neither "
                             "--seg-dense-prompt nor --seg-sam-checkpoint")
        if self.image_encoder == "sam" and not (self.sam_checkpoint or self.sam_encoder):
            raise ValueError("--seg-image-encoder sam needs --seg-sam-checkpoint FILE "
                             "(an original sam_vit_{b,l,h}_*.pth, or a smaller one)")

    def decoder_config(self) -> MaskDecoderConfig:
        return MaskDecoderConfig(**{theirs: getattr(self, ours)
                                    for ours, theirs in DECODER_FIELDS.items()})

    def with_decoder(self, decoder: MaskDecoderConfig) -> "SegConfig":
        """This config with `decoder`'s sizes (SAM's, when its decoder is loaded)."""
        return replace(self, **{ours: getattr(decoder, theirs)
                                for ours, theirs in DECODER_FIELDS.items()})


class SimilarityPrompt(nn.Module):
    """Where the [SEG] query matches the image: at each grid cell, the scaled dot product of the
    query with the image embedding there (n, 1, g, g), a coarse mask. It goes in SAM's dense-prompt
    slot (times a learned direction), as SAM gets its previous low-res mask back, and the decoder's
    output is added to it (upsampled), so the decoder learns the fine edges of a mask the query
    already places. Without it the query reaches the image only through a random decoder's
    attention, which learns slowly (README, "What matters at small scale")."""

    def __init__(self, dim: int):
        super().__init__()
        self.direction = nn.Parameter(torch.randn(dim) / dim ** 0.5)

    def forward(self, query: torch.Tensor, image: torch.Tensor):
        """query (n, C), image embeddings (n, C, g, g) -> (coarse logits (n, 1, g, g),
        dense prompt (n, C, g, g))."""
        similarity = torch.einsum("nc,nchw->nhw", query, image)[:, None] / image.shape[1] ** 0.5
        return similarity, similarity * self.direction[None, :, None, None]


class SegHead(nn.Module):
    """The [SEG] state and the image in, mask logits out. The decoder and prompt pieces come
    built (models/build.py: random, or SAM's own), and so does SAM's image encoder when it is
    the image input; here are only LISA's projections into the decoder's width."""

    def __init__(self, *, mask_decoder: MaskDecoder, prompt_encoder: NoMaskPromptEncoder,
                 lm_dim: int, vision_dim: int, grid_size: int, dense_prompt: str = "none",
                 image_encoder: ImageEncoderViT | None = None):
        super().__init__()
        self.mask_decoder, self.prompt_encoder = mask_decoder, prompt_encoder
        dim = mask_decoder.transformer_dim
        # LISA's text_hidden_fcs: Linear(D, D) -> ReLU -> Linear(D, C) (its dropout is 0).
        self.text_hidden_fcs = nn.Sequential(nn.Linear(lm_dim, lm_dim), nn.ReLU(),
                                             nn.Linear(lm_dim, dim))
        # SAM's embeddings are already the decoder's width; the tower's patch tokens are not.
        self.image_encoder = image_encoder
        self.image_to_mask = nn.Linear(vision_dim, dim) if image_encoder is None else None
        self.grid_size = (grid_size if image_encoder is None  # SAM's: its pos_embed (1, g, g, E)
                          else image_encoder.pos_embed.shape[1])
        self.similarity_prompt = SimilarityPrompt(dim) if dense_prompt == "similarity" else None

    def image_embeddings(self, seg_images: torch.Tensor) -> torch.Tensor:
        """SAM's embeddings (n, C, g, g) of the masks' images: given as they are (the feature
        cache's), or encoded here from SAM-preprocessed pixels (n, 3, S, S)."""
        if seg_images.shape[-1] == self.grid_size:
            return seg_images
        with torch.no_grad():  # frozen, as LISA's
            return self.image_encoder(seg_images)

    def forward(self, seg_hidden: torch.Tensor, image_features: torch.Tensor,
                sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """One (H, W) mask-logit map per [SEG]; `image_features[k]` is the image of [SEG] k: the
        tower's patch tokens (n, P, Dv), or SAM's embeddings (n, C, g, g)."""
        n, g = seg_hidden.shape[0], self.grid_size
        sparse = self.text_hidden_fcs(seg_hidden)[:, None]  # (n, 1, C)
        if self.image_encoder is None:
            image = self.image_to_mask(image_features)  # (n, P, C)
            image = image.transpose(1, 2).reshape(n, -1, g, g)  # (n, C, g, g)
        else:
            image = image_features.to(sparse.dtype)  # (n, C, g, g)
        dense = self.prompt_encoder(n, (g, g))  # (n, C, g, g)
        if self.similarity_prompt is not None:
            coarse, similarity_dense = self.similarity_prompt(sparse[:, 0], image)
            dense = dense + similarity_dense
        image_pe = self.prompt_encoder.get_dense_pe((g, g))  # (1, C, g, g)
        low_res, _ = self.mask_decoder(image_embeddings=image, image_pe=image_pe,
                                       sparse_prompt_embeddings=sparse,
                                       dense_prompt_embeddings=dense,
                                       multimask_output=False)  # (n, 1, 4g, 4g)
        if self.similarity_prompt is not None:
            low_res = low_res + F.interpolate(coarse, size=low_res.shape[-2:], mode="bilinear",
                                              align_corners=False)
        if self.image_encoder is not None:  # SAM's frame: the image was resized and padded
            return [postprocess_masks(low_res[k:k + 1].float(), self.image_encoder.img_size,
                                      tuple(size))[0, 0] for k, size in enumerate(sizes)]
        return [F.interpolate(low_res[k:k + 1].float(), size=tuple(size), mode="bilinear",
                              align_corners=False)[0, 0] for k, size in enumerate(sizes)]

