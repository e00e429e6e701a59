"""Hugging Face Llama-family checkpoint directories: read into, and written from, plain dicts.

A checkpoint directory is `config.json` plus weights (`model.safetensors`, shards listed in
`model.safetensors.index.json`, or a legacy `pytorch_model.bin`). Our parameter names are HF's
without the "model." prefix, so the weights need no translation table: this file is mostly the
config mapping and the checks that turn a wrong file into one clear error line. It knows the
file format only: configs are dicts of TransformerConfig fields, weights are state dicts; the
model side is `Transformer.from_hf` / `.to_hf`:

    model = Transformer.from_hf("SmolLM2-135M-Instruct/")   # LlamaForCausalLM
    model.to_hf("out/")                                    # loads with AutoModelForCausalLM
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minivlm.files import atomic_path, write_json_atomic

# Architectures that are exactly our block: pre-norm RMSNorm, GQA with rotate_half RoPE, SwiGLU.
# Qwen2 adds a bias on q/k/v; Mistral is Llama unless it uses sliding-window attention.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}


# ---------------------------------------------------------------------------------------------
# config.json <-> TransformerConfig fields
# ---------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, source: str) -> dict:
    """TransformerConfig fields from a parsed config.json; `source` names the file in errors."""
    by_model_type = {model_type: name for name, model_type in SUPPORTED_ARCHITECTURES.items()}
    # A config saved on its own (config.save_pretrained) has model_type but no architectures.
    architecture = (hf.get("architectures") or [by_model_type.get(hf.get("model_type"))])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        found = hf.get("architectures") or f"None (model_type={hf.get('model_type')!r})"
        raise ValueError(f"{source}: architectures={found} is not supported; "
                         f"expected one of {sorted(SUPPORTED_ARCHITECTURES)}")

    def reject(field: str, found, expected: str):
        raise ValueError(f"{source}: {field}={found!r} is not supported; expected {expected}")

    if hf.get("hidden_act", "silu") != "silu":
        reject("hidden_act", hf["hidden_act"], "'silu' (SwiGLU)")
    if hf.get("mlp_bias", False):
        reject("mlp_bias", True, "false")
    # Llama's attention_bias puts a bias on o_proj as well; we (like Qwen2) only have q/k/v bias.
    if architecture != "Qwen2ForCausalLM" and hf.get("attention_bias", False):
        reject("attention_bias", True, "false (only Qwen2's q/k/v bias is supported)")
    if architecture == "MistralForCausalLM" and hf.get("sliding_window") is not None:
        reject("sliding_window", hf["sliding_window"], "null (full causal attention)")
    if architecture == "Qwen2ForCausalLM" and hf.get("use_sliding_window", False):
        reject("use_sliding_window", True, "false (full causal attention)")

    # transformers 5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
    rope = dict(hf.get("rope_scaling") or {}) | dict(hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        reject("rope_scaling type", rope_type, "'default' (plain RoPE, no scaling)")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))

    dim, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // num_heads):
        reject("head_dim", hf["head_dim"],
               f"hidden_size / num_attention_heads = {dim // num_heads}")
    return dict(
        vocab_size=hf["vocab_size"], dim=dim, num_layers=hf["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        hidden_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=architecture == "Qwen2ForCausalLM",
        # LlamaConfig and Qwen2Config both default to untied when the field is absent.
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def config_to_hf(config: dict, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for transformers from TransformerConfig fields (`TransformerConfig.to_dict()`):
    Qwen2 when q/k/v carry a bias, Llama otherwise."""
    qwen2 = config["qkv_bias"]
    hf = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": config["vocab_size"], "hidden_size": config["dim"],
        "num_hidden_layers": config["num_layers"], "num_attention_heads": config["num_heads"],
        "num_key_value_heads": config["num_kv_heads"],
        "head_dim": config["dim"] // config["num_heads"],
        "intermediate_size": config["hidden_dim"],
        "max_position_embeddings": config["max_seq_len"], "rms_norm_eps": config["norm_eps"],
        "hidden_act": "silu", "tie_word_embeddings": config["tie_embeddings"],
        # Both spellings: transformers 4 reads rope_theta, transformers 5 rope_parameters.
        "rope_theta": config["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": config["rope_theta"]},
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if qwen2:
        hf["use_sliding_window"] = False
    else:
        hf |= {"attention_bias": False, "mlp_bias": False}
    return hf


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------

def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by HF name. Safetensors first, as transformers does."""
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    for index_name, load in (("model.safetensors.index.json", load_file),
                             ("pytorch_model.bin.index.json", _load_bin)):
        if (path / index_name).exists():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            weights = {}
            for shard in shards:
                weights.update(load(path / shard))
            return weights
    if (path / "pytorch_model.bin").exists():
        return _load_bin(path / "pytorch_model.bin")
    raise ValueError(f"{path}: no weights found; expected model.safetensors, "
                     "model.safetensors.index.json or pytorch_model.bin")


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    # weights_only: a .bin is a pickle, and unpickling arbitrary objects can run code.
    return torch.load(file, map_location="cpu", weights_only=True)


def read_hf_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(TransformerConfig fields, every tensor under our name) from a local HF Llama / Qwen2 /
    Mistral checkpoint directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"{path}: no config.json; expected a Hugging Face checkpoint directory")
    config = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    state = {}
    for hf_name, tensor in read_hf_weights(path).items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints save RoPE's frequencies; ours derive from the config
        if hf_name == "lm_head.weight":
            state[hf_name] = tensor
        elif hf_name.startswith("model."):
            state[hf_name[len("model."):]] = tensor
        else:
            raise ValueError(f"{path}: unexpected tensor {hf_name!r}; expected 'model.*' "
                             "or 'lm_head.weight'")
    return config, state


def write_hf_checkpoint(path: str | Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """config.json + model.safetensors that `AutoModelForCausalLM.from_pretrained` loads, from
    a state dict under our names and its TransformerConfig fields.

    Each file is written beside and moved into place (minivlm.files), weights before config, so
    a crash never leaves a config.json pointing at half-written weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config["tie_embeddings"]:
            continue  # safetensors refuses shared storage; transformers re-ties from the config
        hf_name = name if name == "lm_head.weight" else "model." + name
        tensors[hf_name] = tensor.detach().contiguous().cpu()
    with atomic_path(path / "model.safetensors") as tmp:
        # transformers rejects a safetensors file whose metadata lacks format="pt".
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json_atomic(path / "config.json",
                      config_to_hf(config, state["embed_tokens.weight"].dtype))
