"""A ready model and its tokenizer, from any source: our checkpoints, or a GGUF file.

The weights/ modules read and write file formats and know nothing of the model; models/ builds
modules from configs. This is where the two meet:

    model, tokenizer, run_config = load_vlm("runs/sft")              # a minivlm checkpoint
    lm, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")      # a llama.cpp file
(Hugging Face directories: `Transformer.from_hf(dir)` and `data.hf_tokenizer.load_hf_tokenizer`.)
"""
from __future__ import annotations

from pathlib import Path

import torch

from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.errors import CheckpointError
from minivlm.lora import apply_lora, merge_and_unload
from minivlm.models.build import build_vlm_from_config
from minivlm.models.transformer import Transformer, TransformerConfig
from minivlm.models.vlm import VLMConfig
from minivlm.quant.checkpoint import check_record, finish_lm, meta_lm, swap_in_empty
from minivlm.weights.checkpoint import (RUN_CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE,
                                         load_weights, read_config, read_weights,
                                         resolve_checkpoint)
from minivlm.weights.gguf import read_gguf_checkpoint
from minivlm.weights.gguf_tokenizer import tokenizer_from_metadata


def load_vlm(path, device: str | torch.device = "cpu", merge_lora: bool = False):
    """(model, tokenizer, run_config) from a checkpoint directory or a run's `latest`.

    A LoRA checkpoint is rebuilt with its adapters (so training can resume); `merge_lora` folds
    them into plain weights instead, as the next stage or inference wants. A quantised one
    (config "quantize", minivlm/quant/checkpoint.py) comes back quantised, its LM built on the
    meta device so that no fp32 copy of it is ever made; `merge_lora` then leaves its adapters
    unmerged (beside the int8/int4 base, as QLoRA infers), and says so.
    """
    ckpt = resolve_checkpoint(path)
    run_config = read_config(ckpt)
    config = VLMConfig.from_dict(run_config["model"])
    quant = run_config.get("quantize")
    if quant:
        check_record(quant, str(ckpt / RUN_CONFIG_FILE))
    # The checkpoint holds every weight: none is fetched again. The config keeps naming where
    # the tower's weights first came from ("" = trained here from random).
    model = build_vlm_from_config(config, lm=meta_lm(config.lm) if quant else None,
                                  load_pretrained=False)
    if quant:
        swap_in_empty(model, quant)
    lora = run_config.get("lora")
    if lora:
        apply_lora(model.lm, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                   targets=lora["targets"])
    if quant:  # the file's tensors become the model's (the LM has none of its own)
        model.load_state_dict(read_weights(model, ckpt / WEIGHTS_FILE), assign=True)
        finish_lm(model.lm)
    else:
        load_weights(model, ckpt / WEIGHTS_FILE)
    if lora and merge_lora and quant:
        print(f"{ckpt}: LoRA adapters kept unmerged: the base is {quant['scheme']}-quantised")
    elif lora and merge_lora:
        merge_and_unload(model)
        run_config = dict(run_config, lora=None)
    tokenizer = load_tokenizer(ckpt / TOKENIZER_DIR)
    rows = model.config.lm.vocab_size
    # More rows than pieces is normal (real models pad the embedding); fewer would make any id
    # past the last row an IndexError deep inside the first forward pass.
    if tokenizer.vocab_size > rows:
        raise CheckpointError(f"{ckpt / TOKENIZER_DIR}: {tokenizer.vocab_size} pieces, but the "
                              f"model's embedding has only {rows} rows; this tokenizer does not "
                              "belong to this checkpoint")
    return model.to(device), tokenizer, run_config


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from one GGUF file, every tensor dequantised to `dtype`.

    The tokenizer adds "<image>" and "[SEG]" when the vocabulary lacks them: grow the model with
    `resize_token_embeddings` before use (build_vlm does).
    """
    config, state, metadata = read_gguf_checkpoint(path)
    model = Transformer.from_state_dict(TransformerConfig(**config), state, dtype, str(path))
    return model, tokenizer_from_metadata(metadata, str(path))
