"""Building a VLM: from configs (fresh), from a checkpoint, and choosing which parts train."""
from __future__ import annotations

import dataclasses

import torch

from minivlm.train.checkpoint import load_weights, read_config, resolve_checkpoint
from minivlm.lora import apply_lora, merge_and_unload
from minivlm.data.tokenizer import load_tokenizer
from minivlm.models.transformer import Transformer
from minivlm.models.vlm import VLM, VLMConfig

def build_vlm(config: VLMConfig, tokenizer, lm: Transformer | None = None) -> VLM:
    """A VLM whose vocabulary matches `tokenizer` (a pretrained `lm` gets its embeddings resized
    for the tokens we add, such as <image> and [SEG])."""
    config.image_token_id, config.seg_token_id = tokenizer.image_token_id, tokenizer.seg_token_id
    if lm is None:
        config.lm.vocab_size = tokenizer.vocab_size
    else:
        lm.resize_token_embeddings(tokenizer.vocab_size)
        config.lm = lm.config
    return VLM(config, lm=lm)


def load_vlm(path, device: str | torch.device = "cpu", merge_lora: bool = False):
    """(model, tokenizer, run_config) from a checkpoint directory or a run's `latest`.

    A LoRA checkpoint is rebuilt with its adapters (so training can resume); `merge_lora` folds
    them into plain weights instead, as the next stage or inference wants.
    """
    ckpt = resolve_checkpoint(path)
    run_config = read_config(ckpt)
    config = VLMConfig.from_dict(run_config["model"])
    # The checkpoint holds every weight: never fetch pretrained ones again. The config keeps
    # naming where the tower's weights first came from ("" = trained here from random).
    origin = config.vision.pretrained
    config.vision = dataclasses.replace(config.vision, pretrained="")
    config.seg = dataclasses.replace(config.seg, sam_checkpoint="")
    model = VLM(config)
    model.config.vision.pretrained = origin
    lora = run_config.get("lora")
    if lora:
        apply_lora(model.lm, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                   targets=lora["targets"])
    load_weights(model, ckpt / "model.safetensors")
    if lora and merge_lora:
        merge_and_unload(model)
        run_config = dict(run_config, lora=None)
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    return model.to(device), tokenizer, run_config
