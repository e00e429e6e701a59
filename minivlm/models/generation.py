"""Decoding with a KV cache: the cache itself, the sampling rule, and the prefill-then-decode loop.

`Transformer.generate` calls `generate` below with itself, and `VLM.generate_steps` calls
`decode_steps`, the loop itself, to stream tokens (the web demo); nothing here imports the model,
which is only called (`model(input_ids=..., kv_cache=...)`) and read (`model.config`).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from minivlm.models.attention_mask import positions_from_mask


class KVCache:
    """Pre-allocated keys/values for every layer; `length` is how many positions are filled.
    `config` is the model's TransformerConfig."""

    def __init__(self, config, batch_size: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype)
                     for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype)
                       for _ in range(config.num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Writes this step's (B, nkv, T, hd) keys/values and returns all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions exceed the cache size {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                      top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy when temperature == 0; otherwise temperature, then top-k, then nucleus (top-p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (keeps at least one).
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode_steps(model, input_ids=None, inputs_embeds=None, attention_mask=None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, stop_token_ids=(), pad_token_id: int = 0,
                 generator: torch.Generator | None = None,
                 prompt_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Prefill the prompt once, then decode one token at a time from the KV cache, yielding each
    step's new tokens (B,) as soon as they are sampled: `generate` stacks them, the web demo
    shows each one as it comes. The only decoding loop in minivlm.

    Batches are left-padded (attention_mask 0 on the left), so every row's next token is
    written at the same column. Rows that hit a stop token get `pad_token_id` afterwards; the
    loop ends when every row has stopped. temperature=0 is greedy.
    `prompt_mask`: a ready (B, 1, T, T) mask for the prompt when it is not plain causal (image
    tokens that see each other, attention_mask.py); each later token sees everything before it.
    """
    prompt = input_ids if input_ids is not None else inputs_embeds
    B, T = prompt.shape[:2]
    device = prompt.device
    dtype = model.embed_tokens.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    # Never decode past the context: stop early instead of failing mid-answer.
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - T)
    if max_new_tokens <= 0:
        raise ValueError(f"the prompt has {T} tokens: no room left in max_seq_len="
                         f"{model.config.max_seq_len} to generate")
    cache = KVCache(model.config, B, T + max_new_tokens, device, dtype)
    prompt_mask = attention_mask if prompt_mask is None else prompt_mask
    logits = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=prompt_mask,
                   position_ids=positions_from_mask(attention_mask, 0, T, device),
                   kv_cache=cache)[:, -1]  # (B, V)
    stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        token = token.masked_fill(finished, pad_token_id)
        yield token
        finished |= torch.isin(token, stop)
        if bool(finished.all()):
            return
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)  # (B, S+1)
        logits = model(input_ids=token[:, None], attention_mask=attention_mask,
                       kv_cache=cache)[:, -1]  # (B, V)


@torch.no_grad()
def generate(model, input_ids=None, inputs_embeds=None, attention_mask=None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_token_ids=(), pad_token_id: int = 0,
             generator: torch.Generator | None = None, prompt_mask=None) -> torch.Tensor:
    """The new tokens (B, N) of `decode_steps` (same arguments): rows that hit a stop token are
    filled with `pad_token_id` afterwards; N is 0 when max_new_tokens is."""
    steps = list(decode_steps(model, input_ids, inputs_embeds, attention_mask, max_new_tokens,
                              temperature, top_k, top_p, stop_token_ids, pad_token_id, generator,
                              prompt_mask))
    prompt = input_ids if input_ids is not None else inputs_embeds
    return torch.stack(steps, dim=1) if steps else prompt.new_zeros(prompt.shape[0], 0).long()
