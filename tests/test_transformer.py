"""The hand-written Transformer against transformers' Llama, plus KV-cache and causality checks."""
import pytest
import torch
import transformers

from minivlm.models.generation import KVCache, sample_next_token
from minivlm.models.transformer import Transformer, TransformerConfig


def tiny_config(**overrides) -> TransformerConfig:
    base = dict(vocab_size=97, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=96,
                max_seq_len=64, rope_theta=500.0)
    base.update(overrides)
    return TransformerConfig(**base)


def hf_llama_from(model: Transformer) -> transformers.LlamaForCausalLM:
    """The same weights in transformers' Llama, through the HF name prefix map."""
    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        intermediate_size=c.hidden_dim, max_position_embeddings=c.max_seq_len,
        rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        attention_bias=False, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    state = {("" if k.startswith("lm_head") else "model.") + k: v
             for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_hf_llama(tied):
    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_embeddings=tied)).eval()
    hf = hf_llama_from(model)
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert ours.abs().max() > 0.1  # the comparison is not between two near-zero tensors


def test_left_padded_batch_equals_hf_and_unpadded_rows():
    torch.manual_seed(1)
    model = Transformer(tiny_config()).eval()
    hf = hf_llama_from(model)
    ids = torch.randint(1, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # row 0 is left-padded by 5
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        row0_alone = model(ids[:1, 5:])
        theirs = hf(ids, attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(ours[0, 5:], row0_alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[:, 5:], theirs[:, 5:], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=0)


def test_kv_cache_prefill_and_token_by_token_equal_full_sequence():
    torch.manual_seed(2)
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 20, ids.device, torch.float32)
        prefill = model(ids[:, :12], kv_cache=cache)
        steps = [model(ids[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]
        cache_1 = KVCache(model.config, 2, 20, ids.device, torch.float32)
        one_by_one = torch.cat([model(ids[:, t:t + 1], kv_cache=cache_1) for t in range(20)], 1)
    torch.testing.assert_close(torch.cat([prefill] + steps, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=0)


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(3)
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, 97, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0, rtol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_inputs_embeds_and_return_hidden():
    torch.manual_seed(4)
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        logits, hidden = model(inputs_embeds=model.embed_tokens(ids), return_hidden=True)
    torch.testing.assert_close(logits, model(ids), atol=0, rtol=0)
    torch.testing.assert_close(model.lm_head(hidden), logits, atol=1e-6, rtol=0)


def test_greedy_generate_equals_hf_and_handles_left_padding():
    torch.manual_seed(5)
    model = Transformer(tiny_config()).eval()
    hf = hf_llama_from(model)
    prompt = torch.randint(1, 97, (1, 7))
    ours = model.generate(prompt, max_new_tokens=12)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None)[:, 7:]
    assert ours.tolist() == theirs.tolist()
    # The same prompt left-padded inside a batch decodes the same tokens.
    other = torch.randint(1, 97, (1, 10))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1), other])
    mask = (torch.arange(10)[None] >= torch.tensor([[3], [0]])).long()
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=12)
    assert batched[0].tolist() == ours[0].tolist()
    assert batched[1].tolist() == model.generate(other, max_new_tokens=12)[0].tolist()


def test_generate_stops_and_pads_after_stop_token():
    torch.manual_seed(6)
    model = Transformer(tiny_config()).eval()
    prompt = torch.randint(1, 97, (1, 5))
    free = model.generate(prompt, max_new_tokens=8)[0].tolist()
    stopped = model.generate(prompt, max_new_tokens=8, stop_token_ids=[free[2]], pad_token_id=-1)
    first = free.index(free[2])
    assert stopped[0].tolist() == free[:first + 1]  # ends right at the first stop token


def test_top_k_and_top_p_sampling_only_draw_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    k2 = {int(sample_next_token(logits, 1.0, 2, None, g)) for _ in range(200)}
    assert k2 == {0, 1}
    # softmax ≈ [.66, .24, .09, ...]: top_p=0.8 keeps tokens 0 and 1 only.
    p = {int(sample_next_token(logits, 1.0, None, 0.8, g)) for _ in range(300)}
    assert p == {0, 1}


def test_resize_token_embeddings_keeps_old_rows():
    torch.manual_seed(7)
    model = Transformer(tiny_config(tie_embeddings=True))
    old = model.embed_tokens.weight.detach().clone()
    model.resize_token_embeddings(99)
    assert model.lm_head.weight is model.embed_tokens.weight
    torch.testing.assert_close(model.embed_tokens.weight[:97], old)
    torch.testing.assert_close(model.embed_tokens.weight[98], old.mean(0))
    assert model(torch.tensor([[98]])).shape == (1, 1, 99)


def test_sequence_longer_than_context_is_a_clear_error():
    model = Transformer(tiny_config(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_generate_stops_at_the_context_limit():
    torch.manual_seed(8)
    model = Transformer(tiny_config(max_seq_len=12)).eval()
    assert model.generate(torch.randint(0, 97, (1, 8)), max_new_tokens=50).shape == (1, 4)
    with pytest.raises(ValueError, match="no room left in max_seq_len=12"):
        model.generate(torch.randint(0, 97, (1, 12)), max_new_tokens=5)
