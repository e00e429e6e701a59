"""Hand-written LoRA against peft's: same numbers, same gradients, same files in both directions."""
import json

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minivlm.lora import (LoRALinear, apply_lora, lora_modules, merge_and_unload, merge_lora,
                          unmerge_lora)
from minivlm.models.transformer import Transformer
from minivlm.train.trainable import count_parameters, mark_trainable
from minivlm.weights.peft import load_peft_adapter, save_peft_adapter
from test_transformer import hf_llama_from, tiny_config

TARGETS = ["q_proj", "v_proj", "gate_proj"]


def randomize_adapters(model: nn.Module, seed: int) -> None:
    """Non-zero B (zero-init B would hide any error in the B A x path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def our_name(peft_name: str) -> str:
    """base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    -> layers.0.self_attn.q_proj.lora_A.weight"""
    name = peft_name.removeprefix("base_model.model.").replace(".default.", ".")
    return name.removeprefix("model.")


def base_and_hf(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides)).eval()
    return model, hf_llama_from(model)


def test_logits_and_gradients_equal_peft():
    ours, hf = base_and_hf()
    apply_lora(ours, r=4, alpha=8, targets=TARGETS)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(ours, seed=1)
    ours_params = dict(ours.named_parameters())
    theirs_lora = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, p in theirs_lora.items():
            p.copy_(ours_params[our_name(name)])
    trained = {n for n, p in ours_params.items() if p.requires_grad}
    assert {our_name(n) for n in theirs_lora} == trained

    ids = torch.randint(0, 97, (2, 15))
    ours_logits, theirs_logits = ours(ids), theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, theirs_logits, atol=1e-5, rtol=0)
    with theirs.disable_adapter(), torch.no_grad():
        base_logits = theirs(input_ids=ids).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapters do change the output

    for logits in (ours_logits, theirs_logits):
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in theirs_lora.items():
        ours_grad = ours_params[our_name(name)].grad
        assert ours_grad.abs().max() > 1e-4, name
        torch.testing.assert_close(ours_grad, p.grad, atol=1e-5, rtol=0)


def test_zero_init_adapter_leaves_outputs_exactly_unchanged():
    model, _ = base_and_hf()
    ids = torch.randint(0, 97, (2, 11))
    before = model(ids)
    apply_lora(model, targets=("attn", "mlp"))
    assert torch.equal(model(ids), before)
    assert all(m.lora_A.weight.abs().sum() > 0 for m in lora_modules(model).values())


def test_lora_linear_is_base_plus_scaled_low_rank_with_dropout_on_the_input():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=3.0, dropout=0.5).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T * 1.5
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_merge_unmerge_and_unload():
    model, _ = base_and_hf()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, targets="all-linear")
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        merge_lora(model)  # idempotent: no double add
        torch.testing.assert_close(model(ids), merged, atol=0, rtol=0)
        unmerge_lora(model)
        restored = {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()
                    if "lora_" not in k}
        plain = merge_and_unload(model)
        unloaded = plain(ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert (merged - base).abs().max() > 1e-2  # the merged update is not negligible
    for k, v in original.items():
        torch.testing.assert_close(restored[k], v, atol=1e-6, rtol=0)
    assert set(plain.state_dict()) == set(original) and not lora_modules(plain)
    torch.testing.assert_close(unloaded, unmerged, atol=1e-5, rtol=0)


def test_merge_refuses_a_tied_lm_head():
    model, _ = base_and_hf(tie_embeddings=True)
    apply_lora(model, targets=("lm_head",))
    with pytest.raises(ValueError, match="tied"):
        merge_lora(model)


class TinyVLM(nn.Module):
    """The shape of minivlm's VLM that matters here: an LM under `lm`, a projector, a seg head."""

    def __init__(self, tied=False):
        super().__init__()
        self.lm = Transformer(tiny_config(tie_embeddings=tied))
        self.projector = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 64))
        self.seg_head = nn.Module()
        self.seg_head.text_hidden_fcs = nn.Sequential(nn.Linear(64, 64), nn.ReLU(),
                                                      nn.Linear(64, 16))
        self.seg_head.mask_decoder = nn.Linear(16, 16)


def test_only_the_intended_parameters_train():
    vlm = TinyVLM()
    apply_lora(vlm, r=4, targets=("attn", "projector"))
    trainable, total = mark_trainable(vlm)  # default extras
    names = {n for n, p in vlm.named_parameters() if p.requires_grad}
    expected = {f"lm.layers.{i}.self_attn.{proj}.{ab}.weight"
                for i in range(2) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
                for ab in ("lora_A", "lora_B")}
    expected |= {f"projector.{i}.{ab}.weight" for i in (0, 2) for ab in ("lora_A", "lora_B")}
    expected |= {"lm.lm_head.weight", "lm.embed_tokens.weight"}
    expected |= {f"seg_head.text_hidden_fcs.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    expected |= {"seg_head.mask_decoder.weight", "seg_head.mask_decoder.bias"}
    assert names == expected
    # closed form: per layer 2x(4x64 + 64x4) for q,o and 4x64 + 32x4 for k,v (kv dim 32)
    lora = 2 * (2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4))
    lora += (4 * 8 + 64 * 4) + (4 * 64 + 64 * 4)  # projector.0 (8 -> 64), projector.2 (64 -> 64)
    extras = 2 * 97 * 64 + (64 * 64 + 64) + (64 * 16 + 16) + (16 * 16 + 16)
    assert trainable == lora + extras
    assert total == sum(p.numel() for p in vlm.parameters())
    assert count_parameters(vlm) == (trainable, total)

    apply_lora(tied := Transformer(tiny_config(tie_embeddings=True)), targets=("q_proj",))
    mark_trainable(tied, extra=("lm_head",))  # tied: naming lm_head trains the shared embedding
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("tied", [False, True])
def test_ours_to_peft_round_trip_with_modules_to_save(tmp_path, tied):
    ours, hf = base_and_hf(tie_embeddings=tied)
    apply_lora(ours, r=4, alpha=8, targets=TARGETS)
    randomize_adapters(ours, seed=4)
    mark_trainable(ours, extra=("lm_head", "norm"))  # "norm": the final norm only
    with torch.no_grad():  # as if trained: PEFT must carry them as modules_to_save
        ours.lm_head.weight.mul_(1.5)
        ours.norm.weight.mul_(1.2)
    save_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(TARGETS)
    # tied: one tensor under two names; PEFT gets both so its untied copies stay equal.
    # "norm" is spelled in full: PEFT matches by suffix and would also pick every input_layernorm.
    assert sorted(config["modules_to_save"]) == ["embed_tokens"] * tied + ["lm_head", "model.norm"]
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight" in \
        load_file(tmp_path / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    back, _ = base_and_hf(tie_embeddings=tied)
    load_peft_adapter(back, tmp_path)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids), ours(ids), atol=0, rtol=0)


def test_vlm_lm_adapter_saved_by_prefix(tmp_path):
    torch.manual_seed(0)
    vlm = TinyVLM().eval()
    hf = hf_llama_from(vlm.lm)
    apply_lora(vlm, r=4, alpha=8, targets=TARGETS)
    randomize_adapters(vlm, seed=5)
    mark_trainable(vlm)  # seg-head extras are outside the LM: not in the adapter
    with torch.no_grad():
        vlm.lm.embed_tokens.weight.add_(0.1)
    save_peft_adapter(vlm, tmp_path)
    assert sorted(json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]) \
        == ["embed_tokens", "lm_head"]
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    torch.manual_seed(0)
    back = load_peft_adapter(TinyVLM().eval(), tmp_path)  # the same base weights, prefix "lm."
    assert set(lora_modules(back)) == set(lora_modules(vlm))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, vlm.lm(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(back.lm(ids), vlm.lm(ids), atol=0, rtol=0)


def test_regex_targets_round_trip_through_peft(tmp_path):
    ours, hf = base_and_hf()
    apply_lora(ours, r=2, alpha=2, targets=(r"re:layers\.1\.(self_attn\.[qk]|mlp\.down)_proj",))
    assert list(lora_modules(ours)) == ["layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj",
                                        "layers.1.mlp.down_proj"]
    randomize_adapters(ours, seed=6)
    save_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # exact names: "q_proj" would pick layer 0 too
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    adapted = {n.split(".lora_A")[0] for n, _ in theirs.named_parameters() if "lora_A" in n}
    assert adapted == {f"base_model.model.model.{n}" for n in lora_modules(ours)}
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=0)


def test_peft_to_ours_round_trip(tmp_path):
    ours, hf = base_and_hf()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"],
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    theirs.save_pretrained(tmp_path)
    load_peft_adapter(ours, tmp_path)
    assert set(lora_modules(ours)) == {f"layers.{i}.{m}" for i in range(2) for m in
                                       ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj")}
    assert ours.lm_head.weight.requires_grad and not ours.norm.weight.requires_grad
    ids = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), theirs.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_no_match_lists_existing_linear_names():
    model, _ = base_and_hf()
    with pytest.raises(ValueError, match=r"'qproj'.*layers\.N\.self_attn\.q_proj.*lm_head"):
        apply_lora(model, targets=("q_proj", "qproj"))
    assert not lora_modules(model)  # nothing was wrapped before the error


def test_shape_mismatched_adapter_names_the_tensor(tmp_path):
    ours, _ = base_and_hf()
    apply_lora(ours, r=4, alpha=8, targets=TARGETS)
    save_peft_adapter(ours, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(64, 4)  # v_proj's output is 32 wide (2 kv heads x 16)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    fresh, _ = base_and_hf()
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.v_proj\.lora_B\.weight has shape "
                                         r"\(64, 4\), but the model expects \(32, 4\)"):
        load_peft_adapter(fresh, tmp_path)
    assert not lora_modules(fresh)  # validated before anything was wrapped
