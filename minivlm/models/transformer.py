"""A Llama-style decoder-only Transformer, written out in full.

Leaves first: RMSNorm -> rotary embeddings -> attention (GQA) -> SwiGLU MLP -> block -> model;
KV-cache decoding is in generation.py, the weight file formats in minivlm/weights/.
Parameter names follow Hugging Face's LlamaForCausalLM without its "model." prefix
(`embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.gate_proj`, `norm`, `lm_head`), so loading real
weights (`from_hf`, `from_gguf`) and PEFT adapters is a prefix map, not a translation table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivlm.models.attention_mask import (attend, build_attention_mask, is_ready_mask,
                                           positions_from_mask)
from minivlm.models.generation import KVCache, generate
from minivlm.ranges import above, at_least, check_ranges
from minivlm.weights.gguf import read_gguf_checkpoint
from minivlm.weights.hf import read_hf_checkpoint, write_hf_checkpoint
from minivlm.weights.state_dict import check_state_dict


@dataclass
class TransformerConfig:
    """Defaults build the tiny model that trains on a laptop CPU; real sizes are in PRESETS."""

    vocab_size: int = field(default=512, metadata=at_least(1))
    dim: int = field(default=128, metadata=at_least(1))
    num_layers: int = field(default=4, metadata=at_least(1))
    num_heads: int = field(default=4, metadata=at_least(1))
    num_kv_heads: int = field(default=2, metadata=at_least(1))
    hidden_dim: int = field(default=384, metadata=at_least(1))  # SwiGLU inner size
    max_seq_len: int = field(default=1024, metadata=at_least(1))
    rope_theta: float = field(default=10000.0, metadata=above(0))
    norm_eps: float = field(default=1e-5, metadata=above(0))
    qkv_bias: bool = False  # Qwen2 puts a bias on q/k/v
    tie_embeddings: bool = False  # SmolLM2 shares embed_tokens with lm_head
    head_dim: int = field(init=False)

    def __post_init__(self):
        check_ranges(self)  # first: num_heads=0 would fail below as a ZeroDivisionError
        if self.dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"TransformerConfig: dim={self.dim} must divide by num_heads="
                             f"{self.num_heads}, and num_heads by num_kv_heads={self.num_kv_heads}")
        self.head_dim = self.dim // self.num_heads

    def to_dict(self) -> dict:
        config = asdict(self)
        config.pop("head_dim")
        return config


# Shapes of real models (weights come from `from_hf` / `from_gguf`).
PRESETS: dict[str, dict] = {
    "tiny": dict(),
    "smollm2-135m": dict(vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         hidden_dim=1536, max_seq_len=8192, rope_theta=100000.0,
                         tie_embeddings=True),
    "smollm2-360m": dict(vocab_size=49152, dim=960, num_layers=32, num_heads=15, num_kv_heads=5,
                         hidden_dim=2560, max_seq_len=8192, rope_theta=100000.0,
                         tie_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, dim=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         hidden_dim=4864, max_seq_len=32768, rope_theta=1000000.0,
                         norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    "gpt-125m": dict(vocab_size=32000, dim=768, num_layers=12, num_heads=12, num_kv_heads=12,
                     hidden_dim=2048, max_seq_len=2048),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32: the mean of squares overflows/loses precision in fp16/bf16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021), HF's `rotate_half` layout: the two halves of each head are rotated."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        positions = torch.arange(max_seq_len, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # (L, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, hd)
        # Not saved in checkpoints: they are a function of the config.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        cos = self.cos[position_ids].unsqueeze(1).to(dtype)  # (B, 1, T, hd)
        sin = self.sin[position_ids].unsqueeze(1).to(dtype)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.dim, config.dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x, cos, sin, attn_mask, kv_cache: KVCache | None, layer_index: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_index, k, v)  # (B, nkv, S, hd), S = cached + T
        # SDPA (per sample for DocumentSpans), or FlexAttention for a BlockMask; each kv head
        # serves nh/nkv query heads.
        out = attend(q, k, v, attn_mask, enable_gqa=self.num_kv_heads != self.num_heads)
        # out: (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, kv_cache, layer_index):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache, layer_index)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        # Llama's initializer_range: N(0, 0.02) for every matrix, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                kv_cache: KVCache | None = None, return_hidden: bool = False):
        hidden = self.hidden_states(input_ids, inputs_embeds, attention_mask, position_ids,
                                    kv_cache)
        logits = self.lm_head(hidden)  # (B, T, V)
        return (logits, hidden) if return_hidden else logits

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None,
                      position_ids=None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final-norm hidden states (B, T, D), without the LM head: a training loss only needs
        logits where there are labels, which saves most of the (T x vocab) head on a VLM.
        `attention_mask`: a (B, S) padding mask (1 = real token), or a ready boolean
        (B, 1, T, S) mask (True = may attend), BlockMask or DocumentSpans, with its
        `position_ids` (B, T)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Transformer.forward: pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        past_len = kv_cache.length if kv_cache is not None else 0
        if past_len + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past_len + T} tokens exceeds max_seq_len="
                             f"{self.config.max_seq_len}")
        if is_ready_mask(attention_mask):  # (B, 1, T, S), BlockMask, spans (attention_mask.py)
            attn_mask = attention_mask
            if position_ids is None:
                position_ids = positions_from_mask(None, past_len, T, x.device)
        else:  # (B, S) padding mask, or None
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask, past_len, T, x.device)
            attn_mask = build_attention_mask(attention_mask, T, past_len, x.device)
        cos, sin = self.rotary(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)

    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, stop_token_ids=(), pad_token_id: int = 0,
                 generator: torch.Generator | None = None, prompt_mask=None) -> torch.Tensor:
        """New tokens (B, N) by KV-cache decoding, left-padded batches; see generation.py."""
        return generate(self, input_ids, inputs_embeds, attention_mask, max_new_tokens,
                        temperature, top_k, top_p, stop_token_ids, pad_token_id, generator,
                        prompt_mask)

    def resize_token_embeddings(self, new_vocab_size: int):
        """Grow (or shrink) the vocabulary; new rows start at the mean embedding, as HF suggests,
        so a new token like [SEG] begins as an 'average' token rather than noise."""
        old = self.embed_tokens.weight.data
        if new_vocab_size == old.shape[0]:
            return
        keep = min(old.shape[0], new_vocab_size)
        new_embed = nn.Embedding(new_vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
        new_embed.weight.data[:keep] = old[:keep]
        new_embed.weight.data[keep:] = old.mean(0)
        self.embed_tokens = new_embed
        old_head = self.lm_head.weight.data
        self.lm_head = nn.Linear(old.shape[1], new_vocab_size, bias=False, device=old.device,
                                 dtype=old.dtype)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight.data[:keep] = old_head[:keep]
            self.lm_head.weight.data[keep:] = old_head.mean(0)
        # A new config rather than an edit: a config object may be shared (a VLMConfig's lm).
        self.config = replace(self.config, vocab_size=new_vocab_size)

    # Real weights: the file formats live in minivlm/weights/; these are the entry points.
    @classmethod
    def from_state_dict(cls, config: TransformerConfig, state: dict[str, torch.Tensor],
                        dtype: torch.dtype = torch.float32, source: str = "state dict"):
        """A model holding `state` (our names); a bad name or shape is an error naming `source`."""
        model = cls(config).to(dtype)
        state = check_state_dict(state, model.state_dict(), config.tie_embeddings, source)
        model.load_state_dict(state, strict=True)
        return model.eval()

    @classmethod
    def from_hf(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "Transformer":
        fields, state = read_hf_checkpoint(path)
        return cls.from_state_dict(TransformerConfig(**fields), state, dtype, str(path))

    def to_hf(self, path: str | Path) -> None:
        write_hf_checkpoint(path, self.state_dict(), self.config.to_dict())

    @classmethod
    def from_gguf(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "Transformer":
        fields, state, _ = read_gguf_checkpoint(path)
        return cls.from_state_dict(TransformerConfig(**fields), state, dtype, str(path))

