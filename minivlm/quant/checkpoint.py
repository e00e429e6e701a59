"""Quantised checkpoints: what config.json records, and a model rebuilt around the file's tensors
without its fp32 weights ever existing.

    config.json  {"lm": {...}, "quantize": {"scheme": "int4", "group_size": 64,
                                            "include_vision": false, "format_version": 1}}
model.safetensors then holds `weight_int8` + `scales` (int8) or `weight_int4` (two nibbles per
byte) + `scales_and_zeros` (int4) under each quantised layer's name, and everything else as
before. Loading builds the model on the meta device (no memory), swaps in quantised layers of
the recorded kind and assigns the file's tensors to it (`load_state_dict(assign=True)`), so the
only weights in memory are the file's. A record this code does not know is refused in one line:
a newer format may lay the bytes out differently, and reading it as ours would give garbage.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from minivlm.models.transformer import RotaryEmbedding, Transformer, TransformerConfig
from minivlm.quant.int4 import DEFAULT_GROUP_SIZE, Int4Linear
from minivlm.quant.int8 import Int8Linear
from minivlm.quant.swap import SCHEMES, target_linears

FORMAT_VERSION = 1  # bump when a layer's tensors or their meaning change


def quant_record(scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                 include_vision: bool = False) -> dict:
    return {"scheme": scheme, "group_size": group_size if scheme == "int4" else None,
            "include_vision": include_vision, "format_version": FORMAT_VERSION}


def check_record(record: dict, source: str) -> dict:
    """`record` if this code reads it; one line naming `source` otherwise."""
    scheme, version = record.get("scheme"), record.get("format_version")
    if scheme not in SCHEMES or version != FORMAT_VERSION:
        raise ValueError(f"{source}: quantize scheme {scheme!r} at format version {version!r} "
                         f"is not one this minivlm reads ({', '.join(SCHEMES)} at version "
                         f"{FORMAT_VERSION}); convert the model again with this version")
    return record


def swap_in_empty(model: nn.Module, record: dict) -> nn.Module:
    """The Linears `quantize_model` would quantise replaced by quantised layers of the same
    shapes on the same device (meta: no memory), waiting for a file's tensors."""
    targets, _ = target_linears(model, record.get("include_vision", False))
    for name, linear in targets.items():
        like = dict(dtype=linear.weight.dtype, device=linear.weight.device)
        bias = linear.bias is not None
        layer = (Int8Linear(linear.in_features, linear.out_features, bias, **like)
                 if record["scheme"] == "int8" else
                 Int4Linear(linear.in_features, linear.out_features, bias,
                            group_size=record["group_size"], **like))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model


def meta_lm(config: TransformerConfig, dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer whose tensors are all on the meta device: shapes, no memory."""
    with torch.device("meta"):
        return Transformer(config).to(dtype)


def finish_lm(lm: Transformer) -> Transformer:
    """After `load_state_dict(assign=True)`: the tie the assignment broke (each name got its own
    tensor), and the rotary tables, which no file holds (a function of the config)."""
    if lm.config.tie_embeddings:
        lm.lm_head.weight = lm.embed_tokens.weight
    c = lm.config
    lm.rotary = RotaryEmbedding(c.head_dim, c.max_seq_len, c.rope_theta).to(
        lm.embed_tokens.weight.device)
    return lm


def load_quantized_lm(config: TransformerConfig, state: dict[str, torch.Tensor], record: dict,
                      source: str) -> Transformer:
    """A quantised Transformer holding `state` (read from `source`), on the state's device."""
    check_record(record, source)
    dtype = state["embed_tokens.weight"].dtype
    lm = swap_in_empty(meta_lm(config, dtype), record)
    state = dict(state)
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    expected = lm.state_dict()
    for name, tensor in state.items():
        if name not in expected or tensor.shape != expected[name].shape:
            shape = tuple(expected[name].shape) if name in expected else "no such tensor"
            raise ValueError(f"{source}: tensor {name!r} {tuple(tensor.shape)} does not fit a "
                             f"{record['scheme']} model of this config (expected {shape})")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} in all)")
    lm.load_state_dict(state, assign=True)
    return finish_lm(lm).eval()
