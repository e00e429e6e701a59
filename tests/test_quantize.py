"""Weight-only int8 / int4 (minivlm/quant/): error bounds in values, the packed kernels against
the dequantise-then-matmul reference on the same quantised weights, what quantize_model swaps and
keeps, and the one-line refusals. Tiny tensors and models, CPU, well under a second each."""
import pytest
import torch
import torch.nn as nn

from minivlm.models.build import build_vlm_from_config
from minivlm.models.presets import preset_config
from minivlm.models.transformer import Transformer, TransformerConfig
from minivlm.quant.int4 import (Int4Linear, dequantize_int4, pack_nibbles, quantize_int4,
                                unpack_nibbles)
from minivlm.quant.int8 import Int8Linear, dequantize_int8, quantize_int8
from minivlm.quant.swap import quantize_model, quantized_layers, weight_bytes


def weight(N=96, K=256, seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int8_error_is_at_most_half_a_step_per_row():
    w = weight()
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127  # each row's largest hits the end
    error = (dequantize_int8(q, scales) - w).abs()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert (error <= step / 2 * (1 + 1e-5)).all()
    # N(0, 0.05) rows of 256: max|w| ~ 0.155, a step ~1.2e-3, so a mean error of a quarter
    # step (uniform rounding) and 0.7% of the weight's norm
    assert error.max() < 1e-3 and 2.5e-4 < error.mean() < 3.5e-4
    assert (error.norm() / w.norm()).item() < 0.008


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group_size):
    w = weight()
    q, scales_and_zeros = quantize_int4(w, group_size)
    assert q.min() == 0 and q.max() == 15 and scales_and_zeros.shape == (256 // group_size, 96, 2)
    error = (dequantize_int4(q, scales_and_zeros) - w).abs()
    groups = w.reshape(96, -1, group_size)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # (N, G)
    assert (error.reshape(96, -1, group_size) <= step[..., None] / 2 + 1e-7).all()
    relative = (error.norm() / w.norm()).item()
    # 0.079 at 32 columns a group, 0.090 at 64, 0.100 at 128: wider groups, coarser steps
    assert 0.05 < relative < {32: 0.085, 64: 0.095, 128: 0.105}[group_size]
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


def test_int8_kernel_equals_reference_on_the_same_weights():
    linear = nn.Linear(256, 96, bias=True)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        reference = layer(x)
        assert layer.choose_kernel() == "reference"  # fp32 on a CPU: torch's kernel is slow
        assert layer.choose_kernel(any_dtype=True) == "aten._weight_int8pack_mm"
        packed = layer(x)
        torch.testing.assert_close(packed, reference, atol=1e-5, rtol=1e-5)
        assert (reference - linear(x)).abs().max() < 0.01  # and both near the fp32 layer


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_equals_reference_and_saves_portable_nibbles(group_size):
    linear = nn.Linear(256, 96, bias=False)
    layer = Int4Linear.from_linear(linear, group_size)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 256)
    with torch.no_grad():
        reference = layer(x)
        assert layer.choose_kernel() == "reference"
        assert layer.choose_kernel(any_dtype=True) == "aten._weight_int4pack_mm_for_cpu"
        assert not torch.equal(layer.weight_int4, state["weight_int4"])  # the kernel's layout
        torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)
        # A state dict of the packed layer holds the nibbles it started from, bit for bit, and
        # loading one lays it out for the kernel again.
        assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
        layer.load_state_dict(state)
        torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_layers_take_the_kernel_by_default(scheme):
    linear = nn.Linear(128, 64).to(torch.bfloat16)
    layer = (Int8Linear.from_linear(linear) if scheme == "int8"
             else Int4Linear.from_linear(linear, 64))
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = layer(x).float()
        assert layer.choose_kernel().startswith("aten._weight_int")
        # bf16 sums in a different order: a few bf16 steps (~0.4%) of the largest output
        tolerance = 3e-2 * reference.abs().max()
        assert (layer(x).float() - reference).abs().max() < tolerance


def test_gradients_reach_the_input_through_the_dequantised_weight():
    for layer in (Int8Linear.from_linear(nn.Linear(64, 32)),
                  Int4Linear.from_linear(nn.Linear(64, 32), 32)):
        layer.choose_kernel(any_dtype=True)  # a kernel layout still trains x (reference path)
        x = torch.randn(4, 64, requires_grad=True)
        layer(x).sum().backward()
        torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(4, -1))
        assert not any(b.requires_grad for b in layer.buffers())


def tiny_lm(tie: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=64, dim=64, num_layers=2, num_heads=4,
                                         num_kv_heads=2, hidden_dim=128, max_seq_len=32,
                                         tie_embeddings=tie)).eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_model_keeps_a_tied_head_tied_and_the_logits_close(scheme, capsys):
    model = tiny_lm(tie=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
        quantize_model(model, scheme, group_size=64)
        after = model(ids)
    out = capsys.readouterr().out
    assert f"{scheme}" in out and "on 14 Linear layers" in out and "lm_head (tied" in out
    assert "quantized matmul on cpu: reference x14 (torch's CPU kernels are fast in bfloat16 " \
        "only)" in out
    assert model.lm_head.weight is model.embed_tokens.weight  # stored once, fp32
    assert set(quantized_layers(model)) == {f"layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    relative = ((after - before).norm() / before.norm()).item()
    assert relative < {"int8": 0.01, "int4": 0.15}[scheme]
    # Bytes per (N, K) layer: int8 N*K + an fp32 scale a row; int4 N*K/2 + an fp32 scale and
    # zero per 64 columns. 2 layers of q, o (64, 64), k, v (32, 64), gate, up (128, 64), down.
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    expected = sum(N * K + 4 * N if scheme == "int8" else N * K // 2 + K // 64 * N * 8
                   for N, K in shapes)
    sizes = weight_bytes(model)
    assert sizes["quantized"] == expected
    ratio = sum(N * K * 4 for N, K in shapes) / expected
    assert ratio == pytest.approx({"int8": 3.79, "int4": 6.4}[scheme], abs=0.01)
    assert sizes["other"] == (64 * 64 + 2 * 2 * 64 + 64) * 4  # the embedding once, the norms


def test_vision_tower_quantised_on_request_but_not_attention_out_proj():
    torch.manual_seed(0)
    model = build_vlm_from_config(preset_config("test", seg=False), load_pretrained=False)
    quantize_model(model, "int8", include_vision=True, verbose=False)
    names = set(quantized_layers(model))
    assert any(n.startswith("vision.") for n in names) and "lm.lm_head" in names  # untied head
    attention = model.vision.visual.transformer.resblocks[0].attn
    assert type(attention.out_proj) is not Int8Linear and attention.out_proj.weight.dtype == \
        torch.float32
    assert not any(n.startswith("projector") for n in names)
    pixels = torch.randn(1, 3, 32, 32)
    assert model.vision(pixels).isfinite().all()


def test_bad_group_size_and_models_without_linears_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^--quantize-group-size 128 does not divide "
                                         r"layers\.0\.self_attn\.q_proj's 96 input columns; use "
                                         r"32$"):
        quantize_model(Transformer(TransformerConfig(dim=96, num_heads=4, num_kv_heads=2,
                                                     hidden_dim=128)), "int4", group_size=128)
    with pytest.raises(ValueError, match=r"^--quantize-group-size 48: expected one of 32, 64, "
                                         r"128$"):
        quantize_model(tiny_lm(tie=False), "int4", group_size=48)
    with pytest.raises(ValueError, match=r"^quantize_model: no nn.Linear layers to quantise as "
                                         r"int8 \(kept as they are: none\)$"):
        quantize_model(nn.Sequential(nn.Embedding(4, 4), nn.ReLU()), "int8")
    with pytest.raises(ValueError, match=r"^--quantize 'int3': expected one of int8, int4$"):
        quantize_model(tiny_lm(tie=False), "int3")
    model = quantize_model(tiny_lm(tie=False), "int8", verbose=False)
    with pytest.raises(ValueError, match=r"^quantize_model: this model is quantised already$"):
        quantize_model(model, "int8")
