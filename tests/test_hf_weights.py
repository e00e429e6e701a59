"""Hugging Face checkpoints in and out: transformers' own Llama / Qwen2 are the reference."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from minivlm.models.transformer import Transformer, TransformerConfig

TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
            rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=0.1)


def randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """HF initialises norms to 1 and biases to 0; random values make a swapped name visible."""
    torch.manual_seed(123)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)


def tiny_hf(kind: str, tied: bool = False):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**TINY, tie_word_embeddings=tied)
        model = transformers.Qwen2ForCausalLM(config)
    randomize_norms_and_biases(model)
    return model.eval()


def assert_same_logits(ours: Transformer, hf, seed: int = 0):
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mine, theirs = ours(ids), hf(ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    assert theirs.abs().max() > 0.5  # a real comparison, not two near-zero tensors


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_from_hf_logits_and_greedy_generation_equal_transformers(tmp_path, kind, tied):
    hf = tiny_hf(kind, tied)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_hf(tmp_path)
    assert ours.config.tie_embeddings == tied and ours.config.qkv_bias == (kind == "qwen2")
    assert ours.config.rope_theta == 500.0 and ours.config.num_kv_heads == 2
    assert_same_logits(ours, hf)
    prompt = torch.tensor([[5, 17, 3, 88, 41, 9]])
    mine = ours.generate(prompt, max_new_tokens=15)
    theirs = hf.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0,
                         eos_token_id=None)[:, prompt.shape[1]:]
    assert mine.tolist() == theirs.tolist()
    assert len(set(mine[0].tolist())) > 1  # not one token repeated: the check has teeth


def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_logits(Transformer.from_hf(tmp_path), hf)


def test_pytorch_bin_fallback_loads(tmp_path):
    hf = tiny_hf("llama")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_logits(Transformer.from_hf(tmp_path), hf)


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=True), dict(qkv_bias=True)])
def test_to_hf_round_trip(tmp_path, overrides):
    torch.manual_seed(1)
    config = TransformerConfig(vocab_size=97, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                               hidden_dim=96, max_seq_len=64, rope_theta=500.0, **overrides)
    ours = Transformer(config).eval()
    with torch.no_grad():  # Transformer's N(0, 0.02) init gives near-zero logits
        for param in ours.parameters():
            param.normal_(0.0, 0.1)
    randomize_norms_and_biases(ours)
    ours.to_hf(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected_class = "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    assert_same_logits(ours, hf, seed=1)
    back = Transformer.from_hf(tmp_path)
    assert back.config == ours.config
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)
    if config.tie_embeddings:
        assert back.lm_head.weight is back.embed_tokens.weight


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, edit):
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_architecture_and_rope_scaling_are_named(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path)
    edit_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"config.json: architectures=\['GPT2LMHeadModel'\] is "
                                         r"not supported; expected one of \['LlamaForCausalLM'"):
        Transformer.from_hf(tmp_path)
    edit_config(tmp_path, architectures=["LlamaForCausalLM"], rope_parameters=None,
                rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="rope_scaling type='llama3' is not supported"):
        Transformer.from_hf(tmp_path)


def test_missing_misshaped_and_unexpected_tensors_are_named(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path)
    good = load_file(tmp_path / "model.safetensors")
    edit_weights(tmp_path, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'layers.1.mlp.up_proj.weight'"):
        Transformer.from_hf(tmp_path)
    save_file(good, tmp_path / "model.safetensors", metadata={"format": "pt"})
    edit_weights(tmp_path, lambda w: w.update({"model.layers.0.self_attn.k_proj.weight":
                                               torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"tensor 'layers.0.self_attn.k_proj.weight' has shape "
                                         r"\(64, 64\), expected \(32, 64\)"):
        Transformer.from_hf(tmp_path)
    save_file(good, tmp_path / "model.safetensors", metadata={"format": "pt"})
    edit_weights(tmp_path, lambda w: w.update({"model.layers.2.mlp.up_proj.weight":
                                               torch.zeros(96, 64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'layers.2.mlp.up_proj.weight'"):
        Transformer.from_hf(tmp_path)
