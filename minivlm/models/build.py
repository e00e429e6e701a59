"""Building a VLM: from configs (fresh), and giving a loaded one a seg head.

As segment-anything's build_sam.py: the builder reads the config, builds each part and passes it
into its parent; no constructor decides a size or writes to its config. Sizes a part brings with
it (a named open_clip model's image size, patch size and width; a SAM decoder's dimensions) are
resolved here into a new config, so the config.json saved with a checkpoint rebuilds exactly this
model. `load_pretrained=False` builds the same shapes without fetching pretrained weights, for a
checkpoint that holds them all (minivlm/weights/checkpoint.py's `load_vlm`).
"""
from __future__ import annotations

import os
from dataclasses import replace

from minivlm.models.mask_decoder import (MASK_DECODER_PRESETS, MaskDecoderConfig,
                                         build_mask_decoder, load_sam_mask_decoder)
from minivlm.models.dot_mask_head import DotProductMaskHead
from minivlm.models.image_positions import ImagePositions2D
from minivlm.models.seg_head import SegConfig, SegHead
from minivlm.models.conv_stem import ConvStem
from minivlm.models.transformer import Transformer
from minivlm.models.vision import CLIP_MEAN, CLIP_STD, VisionConfig, VisionTower
from minivlm.models.vlm import VLM, VLMConfig, build_projector


def build_vision_tower(config: VisionConfig, load_pretrained: bool = True) -> VisionTower:
    """open_clip's image tower; a named model's own sizes replace the config's."""
    import open_clip  # imported here: it pulls in torchvision, slow to import

    if config.model_name == "tiny":
        clip = open_clip.CLIP(
            embed_dim=config.width,
            vision_cfg=dict(image_size=config.image_size, patch_size=config.patch_size,
                            width=config.width, layers=config.layers,
                            head_width=config.head_width, output_tokens=True),
            text_cfg=dict(context_length=4, vocab_size=8, width=32, heads=1, layers=1),
        )
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        if config.model_name not in open_clip.list_models():  # open_clip would raise RuntimeError
            raise ValueError(f"--vision-model-name {config.model_name!r}: not an open_clip model "
                             "(python -c 'import open_clip; print(open_clip.list_models())')")
        pretrained = config.pretrained if load_pretrained else ""
        if (pretrained and not os.path.isfile(pretrained)
                and not open_clip.get_pretrained_cfg(config.model_name, pretrained)):
            # open_clip's own error is a RuntimeError, which run_cli would show as a traceback.
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(config.model_name))
            raise ValueError(f"{pretrained}: no such file, nor one of open_clip's pretrained tags "
                             f"for {config.model_name} ({tags or 'it has none'})")
        clip = open_clip.create_model(config.model_name, pretrained=pretrained or None)
        preprocess = dict(getattr(clip.visual, "preprocess_cfg", None) or {})
        if config.pretrained and not load_pretrained:
            # The normalisation the weights were trained with is the tag's, even when the
            # weights themselves come from our checkpoint ({} for a file or an unknown tag).
            preprocess |= open_clip.get_pretrained_cfg(config.model_name, config.pretrained)
        mean, std = preprocess.get("mean", CLIP_MEAN), preprocess.get("std", CLIP_STD)
        config = replace(config, image_size=clip.visual.image_size[0],
                         patch_size=clip.visual.patch_size[0],
                         width=clip.visual.transformer.width)
    # Only the image tower is kept, and it returns every patch token, not only the pooled one.
    clip.visual.output_tokens = True
    if config.stem == "conv":  # a fresh tower only (VisionConfig refuses it with pretrained)
        clip.visual.conv1 = ConvStem(config.patch_size, config.width)
    return VisionTower(config, visual=clip.visual, mean=mean, std=std)


def resolve_seg_config(config: SegConfig) -> SegConfig:
    """With `sam_checkpoint` the decoder is SAM's whatever decoder_* say: record SAM's sizes."""
    if not config.sam_checkpoint:
        return config
    sam = MASK_DECODER_PRESETS["sam"]
    return replace(config, decoder_dim=sam.transformer_dim, decoder_depth=sam.depth,
                   decoder_heads=sam.num_heads, decoder_mlp_dim=sam.mlp_dim,
                   iou_head_hidden_dim=sam.iou_head_hidden_dim)


def build_seg_head(config: SegConfig, lm_dim: int, vision: VisionTower,
                   load_pretrained: bool = True) -> SegHead | DotProductMaskHead:
    """LISA's head for a resolved `config`: SAM's decoder weights when `sam_checkpoint` names
    them (and they are wanted), a random decoder otherwise; or the dot-product baseline."""
    if config.head == "dot":
        return DotProductMaskHead(lm_dim=lm_dim, vision_dim=vision.config.width,
                                  grid_size=vision.grid_size, dim=config.decoder_dim)
    decoder_config = MaskDecoderConfig(
        transformer_dim=config.decoder_dim, depth=config.decoder_depth,
        num_heads=config.decoder_heads, mlp_dim=config.decoder_mlp_dim,
        iou_head_hidden_dim=config.iou_head_hidden_dim)
    if config.sam_checkpoint and load_pretrained:
        mask_decoder, prompt_encoder = load_sam_mask_decoder(config.sam_checkpoint,
                                                             decoder_config)
    else:
        mask_decoder, prompt_encoder = build_mask_decoder(decoder_config)
    return SegHead(mask_decoder=mask_decoder, prompt_encoder=prompt_encoder, lm_dim=lm_dim,
                   vision_dim=vision.config.width, grid_size=vision.grid_size,
                   dense_prompt=config.dense_prompt)


def build_vlm_from_config(config: VLMConfig, lm: Transformer | None = None,
                          load_pretrained: bool = True) -> VLM:
    """Every part from `config` (or the given `lm`); `model.config` is the resolved config."""
    # Parts are built in this order so that a seed gives the same initial weights as ever.
    vision = build_vision_tower(config.vision, load_pretrained)
    lm = lm if lm is not None else Transformer(config.lm)
    grid, merge = vision.grid_size, config.projector.merge
    if config.projector.kind == "pixel_shuffle" and grid % merge:  # fail now, not at step one
        raise ValueError(f"--projector-merge {merge}: the tower's {grid}x{grid} patch grid does "
                         "not divide into merged blocks; use --projector-kind mlp or another merge")
    projector = build_projector(config.projector, vision.config.width, lm.config.dim)
    seg, seg_head = config.seg, None
    if seg.enabled:
        seg = resolve_seg_config(seg)
        seg_head = build_seg_head(seg, lm.config.dim, vision, load_pretrained)
    image_positions = None
    if config.image_tokens.positions == "2d":
        if config.projector.kind == "pixel_shuffle":  # the merged grid's side
            grid //= merge
        image_positions = ImagePositions2D(grid, lm.config.dim)
    config = replace(config, vision=vision.config, lm=lm.config, seg=seg)
    return VLM(config, vision=vision, projector=projector, lm=lm, seg_head=seg_head,
               image_positions=image_positions)


def build_vlm(config: VLMConfig, tokenizer, lm: Transformer | None = None) -> VLM:
    """A VLM whose vocabulary matches `tokenizer` (a pretrained `lm` gets its embeddings resized
    for the tokens we add, such as <image> and [SEG]). `config` itself is left as it was."""
    config = replace(config, image_token_id=tokenizer.image_token_id,
                     seg_token_id=tokenizer.seg_token_id)
    if lm is None:
        config = replace(config, lm=replace(config.lm, vocab_size=tokenizer.vocab_size))
    else:
        lm.resize_token_embeddings(tokenizer.vocab_size)
        config = replace(config, lm=lm.config)
    return build_vlm_from_config(config, lm=lm)


def attach_seg_head(model: VLM, seg_config: SegConfig) -> None:
    """Gives a VLM without a segmentation head (a checkpoint of a stage before seg) a fresh
    one built from `seg_config`; `model.config` is replaced by one that records it."""
    seg = resolve_seg_config(seg_config)
    model.seg_head = build_seg_head(seg, model.config.lm.dim, model.vision)
    model.config = replace(model.config, seg=seg)
