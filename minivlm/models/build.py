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
from dataclasses import asdict, replace

from minivlm.models.mask_decoder import (MASK_DECODER_PRESETS, build_mask_decoder,
                                         load_sam_mask_decoder)
from minivlm.models.dot_mask_head import DotProductMaskHead
from minivlm.models.image_positions import ImagePositions2D
from minivlm.models.sam import SamEncoderConfig, build_sam_image_encoder
from minivlm.models.sam_checkpoint import load_sam, no_mask_prompt_encoder, read_sam_encoder_config
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
    """With `sam_checkpoint` the decoder is SAM's whatever decoder_* say: record SAM's sizes; with
    SAM's image encoder, record the encoder's sizes too, read from the file's tensor shapes."""
    if not config.sam_checkpoint:
        return config
    config = config.with_decoder(MASK_DECODER_PRESETS["sam"])
    if config.image_encoder == "sam" and not config.sam_encoder:
        encoder = read_sam_encoder_config(config.sam_checkpoint)
        config = replace(config, sam_encoder=asdict(encoder))
    return config


def build_seg_head(config: SegConfig, lm_dim: int, vision: VisionTower,
                   load_pretrained: bool = True) -> SegHead | DotProductMaskHead:
    """LISA's head for a resolved `config`: SAM's decoder weights when `sam_checkpoint` names
    them (and they are wanted), a random decoder otherwise; with `image_encoder="sam"`, SAM's
    whole model from that file (its frozen ViT encodes the images); or the dot-product
    baseline. `load_pretrained=False` builds the same shapes for a checkpoint to fill."""
    if config.head == "dot":
        return DotProductMaskHead(lm_dim=lm_dim, vision_dim=vision.config.width,
                                  grid_size=vision.grid_size, dim=config.decoder_dim)
    decoder_config = config.decoder_config()
    image_encoder = None
    if config.image_encoder == "sam" and config.sam_checkpoint and load_pretrained:
        sam = load_sam(config.sam_checkpoint, decoder_config)  # strict: every tensor used
        image_encoder, mask_decoder = sam.image_encoder, sam.mask_decoder
        prompt_encoder = no_mask_prompt_encoder(sam.prompt_encoder)
    else:
        if config.image_encoder == "sam":  # the same shapes; a checkpoint fills them
            encoder = dict(config.sam_encoder)
            encoder["global_attn_indexes"] = tuple(encoder["global_attn_indexes"])
            image_encoder = build_sam_image_encoder(SamEncoderConfig(**encoder))
        if config.sam_checkpoint and load_pretrained:
            mask_decoder, prompt_encoder = load_sam_mask_decoder(config.sam_checkpoint,
                                                                 decoder_config)
        else:
            mask_decoder, prompt_encoder = build_mask_decoder(decoder_config)
    if image_encoder is not None:
        image_encoder.requires_grad_(False)  # frozen, as LISA's (train/trainable.py keeps it so)
    return SegHead(mask_decoder=mask_decoder, prompt_encoder=prompt_encoder, lm_dim=lm_dim,
                   vision_dim=vision.config.width, grid_size=vision.grid_size,
                   dense_prompt=config.dense_prompt, image_encoder=image_encoder)


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
