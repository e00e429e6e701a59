"""A GGUF file as a ready (model, tokenizer) pair.

One llama.cpp file carries both the weights (gguf.py reads them) and the tokenizer
(gguf_tokenizer.py rebuilds it); this is the one place that joins them with our Transformer, so
the format readers need not import the model.

    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""
from __future__ import annotations

from pathlib import Path

import torch

from minivlm.models.transformer import Transformer, TransformerConfig
from minivlm.weights.gguf import read_gguf_checkpoint
from minivlm.weights.gguf_tokenizer import tokenizer_from_metadata


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from one GGUF file, every tensor dequantised to `dtype`.

    The tokenizer adds "<image>" and "[SEG]" when the vocabulary lacks them: grow the model with
    `resize_token_embeddings` before use (build_vlm does).
    """
    config, state, metadata = read_gguf_checkpoint(path)
    model = Transformer.from_state_dict(TransformerConfig(**config), state, dtype, str(path))
    return model, tokenizer_from_metadata(metadata, str(path))
