"""bench/mfu.py's FLOP count: a hand count and torch's own FLOP counter on a tiny model."""
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minivlm.models.transformer import Transformer, TransformerConfig

_spec = importlib.util.spec_from_file_location(
    "bench_mfu", Path(__file__).resolve().parents[1] / "bench" / "mfu.py")
mfu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mfu  # dataclasses look their module up there
_spec.loader.exec_module(mfu)

# GQA: 4 query heads of 16, 2 kv heads, so k_proj and v_proj are 64 -> 32.
TINY = TransformerConfig(vocab_size=97, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         hidden_dim=96, max_seq_len=64)


def test_matmul_params_by_hand():
    q_and_o = 2 * 64 * 64
    k_and_v = 2 * 64 * 32  # not 2 * 64 * 64: GQA halves them here
    mlp = 3 * 64 * 96
    head = 64 * 97
    assert mfu.matmul_params(TINY) == 2 * (q_and_o + k_and_v + mlp) + head == 67_648
    # 6 FLOPs per weight and token, plus 12·L·d·T for QK^T and attention·V
    assert mfu.flops_per_token(TINY, 16) == 6 * 67_648 + 12 * 2 * 64 * 16


# tie=True: a tied head is one parameter tensor fewer, but still a matmul that the formula counts.
@pytest.mark.parametrize("tie", [False, True])
def test_flops_match_torch_flop_counter(tie):
    """Forward + backward of a real model, counted by torch (matmuls and SDPA only), equals the
    formula: 6·N + 12·L·d·T per token (the full T x T attention square, as the formula counts).
    SDPA's math backend: its matmuls are counted, the CPU flash kernel is not in torch's table."""
    config = replace(TINY, tie_embeddings=tie)
    model = Transformer(config)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids)  # (B, T, V)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert counter.get_total_flops() == 2 * 16 * mfu.flops_per_token(config, 16)
