"""llama.cpp's GGUF files read into plain dicts: config fields and float tensors under our names.

A GGUF holds metadata (hyper-parameters and the tokenizer, under keys like
`llama.embedding_length`) and tensors under llama.cpp's names (`blk.0.attn_q.weight`). Reading one
takes three steps, each a function below:
  1. metadata -> TransformerConfig fields                              (`config_from_gguf`)
  2. each tensor -> float: dequantise its blocks, restore the torch shape, and for Llama undo the
     row permutation llama.cpp applies to q/k for its RoPE layout      (`read_gguf_tensor`)
  3. llama.cpp names -> ours                                           (`read_gguf_checkpoint`)
The model is built and every tensor checked by `Transformer.from_gguf`, as for HF checkpoints;
the tokenizer the file carries is gguf_tokenizer.py's, and minivlm/load.py's `load_gguf` joins them:

    model = Transformer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGUFValueType
from gguf.quants import dequantize

# llama.cpp architectures that are exactly our block. Llama's q/k rows are permuted on export.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
PERMUTED_QK_ARCHITECTURES = ("llama",)

TOP_LEVEL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def open_gguf(path: str | Path):
    """A gguf.GGUFReader; a file that is not a complete GGUF becomes one clear error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises bare ValueError/IndexError on bad bytes
        # A file cut short fails here too: its last tensor's bytes don't fill the tensor's shape.
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt "
                         f"({type(error).__name__}: {error})") from None


def read_metadata(reader) -> dict[str, Any]:
    """All key/value metadata as Python values (strings, numbers, lists)."""
    def value(field, index: int):
        part = field.parts[index]
        return part.tobytes().decode("utf-8") if element_type == GGUFValueType.STRING \
            else part.tolist()[0]

    metadata = {}
    for name, field in reader.fields.items():
        element_type = field.types[-1]
        if field.types[0] == GGUFValueType.ARRAY:
            metadata[name] = [value(field, index) for index in field.data]
        else:
            metadata[name] = value(field, field.data[0])
    return metadata


def config_from_gguf(metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                     source: str) -> dict:
    """TransformerConfig fields from `{arch}.*` metadata; the vocabulary from the token list."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; expected one "
                         f"of {list(SUPPORTED_ARCHITECTURES)}")

    def field(key: str, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{source}: metadata {arch}.{key} is missing")
        if isinstance(value, list):  # llama.cpp allows per-layer values; our layers are uniform
            raise ValueError(f"{source}: metadata {arch}.{key} is a per-layer list {value[:4]}..., "
                             "expected one number")
        return value

    dim, num_heads = field("embedding_length"), field("attention.head_count")
    rope_dims = metadata.get(f"{arch}.rope.dimension_count", dim // num_heads)
    if rope_dims != dim // num_heads:
        raise ValueError(f"{source}: {arch}.rope.dimension_count={rope_dims}, expected the full "
                         f"head dim {dim // num_heads} (partial RoPE is not supported)")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported; "
                         "expected 'none' (plain RoPE)")

    if "token_embd.weight" not in tensor_shapes:
        raise ValueError(f"{source}: missing tensor 'token_embd.weight'")
    embedding_rows = tensor_shapes["token_embd.weight"][0]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != embedding_rows:
        raise ValueError(f"{source}: vocab mismatch: tokenizer.ggml.tokens has {len(tokens)} "
                         f"entries but token_embd.weight has {embedding_rows} rows")
    return dict(
        vocab_size=embedding_rows, dim=dim, num_layers=field("block_count"),
        num_heads=num_heads, num_kv_heads=field("attention.head_count_kv", num_heads),
        hidden_dim=field("feed_forward_length"), max_seq_len=field("context_length"),
        rope_theta=float(field("rope.freq_base", 10000.0)),  # llama.cpp's default base
        norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
        tie_embeddings="output.weight" not in tensor_shapes,  # llama.cpp reuses token_embd
    )


def torch_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-varying first (ggml's `ne`): a (out, in) matrix is [in, out].
    return tuple(int(n) for n in reversed(tensor.shape))


def read_gguf_tensor(tensor, source: str) -> torch.Tensor:
    """One tensor as float32 in torch layout, whatever its block quantisation."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{source}: tensor {tensor.name!r} has quantisation type {tensor.tensor_type.name}, "
            "which gguf.quants cannot dequantise; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, "
            "Q5_1, Q8_0, Q2_K..Q6_K, IQ*") from None
    # np.array copies: the reader's arrays are read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(torch_shape(tensor)))


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `LlamaModel.permute` of q/k projection rows (and biases).

    llama.cpp rotates adjacent pairs (x0, x1), HF rotates the two halves of each head (x_i,
    x_{i+hd/2}), so on export each head's rows are interleaved:
        w.reshape(nh, 2, hd/2, ...).swapaxes(1, 2)      # [half, i] -> [i, half]
    This is the inverse: read rows as (nh, hd/2, 2) and swap back.
    """
    half = weight.shape[0] // num_heads // 2
    rows = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # (nh, hd/2, 2, ...)
    return rows.transpose(1, 2).reshape(weight.shape)  # (nh*2*hd/2, ...) in HF order


def our_name(gguf_name: str, source: str) -> str:
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if layer and layer.group(2) in LAYER_NAMES:
        return f"layers.{layer.group(1)}.{LAYER_NAMES[layer.group(2)]}.{layer.group(3)}"
    top = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if top and top.group(1) in TOP_LEVEL_NAMES:
        return f"{TOP_LEVEL_NAMES[top.group(1)]}.weight"
    raise ValueError(f"{source}: unexpected tensor {gguf_name!r}; expected llama.cpp names "
                     f"token_embd, output_norm, output, blk.N.{{{', '.join(LAYER_NAMES)}}}")


def read_gguf_checkpoint(path: str | Path
                         ) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any]]:
    """(TransformerConfig fields, every tensor dequantised to float32 under our name, the file's
    metadata) from a llama / qwen2 GGUF file; the metadata also describes its tokenizer."""
    source = str(path)
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    shapes = {tensor.name: torch_shape(tensor) for tensor in reader.tensors}
    config = config_from_gguf(metadata, shapes, source)
    permuted = metadata["general.architecture"] in PERMUTED_QK_ARCHITECTURES
    state = {}
    for tensor in reader.tensors:
        name = our_name(tensor.name, source)
        weight = read_gguf_tensor(tensor, source)
        if permuted and ".attn_q." in tensor.name:
            weight = unpermute_rotary(weight, config["num_heads"])
        elif permuted and ".attn_k." in tensor.name:
            weight = unpermute_rotary(weight, config["num_kv_heads"])
        state[name] = weight
    return config, state, metadata
