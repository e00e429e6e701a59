"""LoRA on a frozen quantised base (QLoRA with our int4/int8): the adapters learn, the base does
not move, gradients reach the inputs, the adapter saves in PEFT's format for the fp32 model, and
train_sft.py --quantize int4 --lora-r 8 writes a checkpoint that load_vlm reads back quantised."""
import copy

import pytest
import torch
import torch.nn.functional as F

import train_sft
from minivlm.load import load_vlm
from minivlm.lora import apply_lora, lora_modules, merge_lora
from minivlm.models.transformer import Transformer, TransformerConfig
from minivlm.quant.int4 import Int4Linear
from minivlm.quant.swap import quantize_model, quantized_layers
from minivlm.weights.peft import load_peft_adapter, save_peft_adapter

MODEL_FLAGS = ["--model-preset", "demo-quick", "--batch-size", "4", "--log-every", "1",
               "--warmup-steps", "1"]


def tiny_lm() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=96, dim=64, num_layers=2, num_heads=4,
                                         num_kv_heads=2, hidden_dim=128, max_seq_len=32,
                                         tie_embeddings=True))


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_adapters_learn_on_a_frozen_quantised_base(scheme, tmp_path):
    fp32 = tiny_lm()
    model = quantize_model(copy.deepcopy(fp32), scheme, group_size=32, kernels=False,
                           verbose=False)
    apply_lora(model, r=8, alpha=16, targets=("attn", "mlp"))
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 96), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # bit-identical base
    assert all(m.lora_B.weight.abs().max() > 0 for m in lora_modules(model).values())
    # The input of a quantised layer gets a gradient, through its dequantised weight.
    x = torch.randn(2, 64, requires_grad=True)
    model.layers[0].self_attn.q_proj(x).sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    with pytest.raises(ValueError, match=rf"^merge_lora: layers.0.self_attn.q_proj's base is "
                                         rf"{scheme}-quantised; the update would be rounded "
                                         r"away: keep the adapter unmerged, or load it onto the "
                                         r"fp32 model$"):
        merge_lora(model)

    # The adapter, saved in PEFT's format, loads onto the fp32 model and moves it as it moved
    # the quantised one (the same delta, on a base that differs by the quantisation error).
    save_peft_adapter(model, tmp_path / "adapter")
    target = apply_lora(copy.deepcopy(fp32), r=8, alpha=16, targets=("attn", "mlp"))
    load_peft_adapter(target, tmp_path / "adapter")
    with torch.no_grad():
        plain, adapted = fp32(ids), target(ids)
        quantized_plain = quantize_model(copy.deepcopy(fp32), scheme, 32, verbose=False)(ids)
        moved_fp32, moved_quantized = adapted - plain, model(ids) - quantized_plain
    cosine = F.cosine_similarity(moved_fp32.flatten(), moved_quantized.flatten(), dim=0)
    assert cosine > 0.9, cosine


def test_train_sft_quantize_int4_lora_checkpoint_loads_back_quantised(shapes_dir,
                                                                      tiny_tokenizer_dir,
                                                                      tmp_path, capsys):
    out = tmp_path / "qlora"
    train_sft.main(["--tokenizer", str(tiny_tokenizer_dir), "--data",
                    str(shapes_dir / "sft.json"), "--out-dir", str(out), "--max-steps", "2",
                    "--save-every", "1", "--keep", "0", "--lora-r", "8", "--quantize", "int4",
                    "--quantize-group-size", "32", *MODEL_FLAGS])
    printed = capsys.readouterr().out
    assert "quantize_model: int4 (group 32)" in printed and "LoRA r=8" in printed
    step1, step2 = (load_vlm(out / f"step_00000{i}")[0] for i in (1, 2))
    for (name, a), b in zip(step1.state_dict().items(), step2.state_dict().values()):
        if "lora_" not in name and name.startswith("lm."):
            assert torch.equal(a, b), name  # the quantised LM never moved
    assert any(not torch.equal(a, b) for name, a, b in zip(
        step1.state_dict(), step1.state_dict().values(), step2.state_dict().values())
        if "lora_B" in name)
    model, _, run_config = load_vlm(out, merge_lora=True)
    assert "LoRA adapters kept unmerged: the base is int4-quantised" in capsys.readouterr().out
    assert run_config["quantize"] == {"scheme": "int4", "group_size": 32,
                                      "include_vision": False, "format_version": 1}
    assert isinstance(model.lm.layers[0].self_attn.q_proj.base_layer, Int4Linear)
    assert len(quantized_layers(model.lm)) == 8  # 7 Linears a layer and the untied lm_head


def test_quantize_without_lora_is_refused(shapes_dir, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^--quantize int4 freezes the LM's Linears: pass "
                                         r"--lora-r N too"):
        train_sft.main(["--tokenizer", str(tiny_tokenizer_dir), "--data",
                        str(shapes_dir / "sft.json"), "--out-dir", str(tmp_path / "x"),
                        "--quantize", "int4", *MODEL_FLAGS])
