"""Weight-only int8: one symmetric scale per output channel (gpt-fast's WeightOnlyInt8Linear).

    q = round(w / s) in [-127, 127],  s = max|w_row| / 127,  w ~ q * s
so every weight is off by at most s / 2. Activations stay in the compute dtype: only the weight
is stored as int8 (a quarter of fp32's bytes, plus one scale per row). Two ways to multiply:
  reference  dequantise, then F.linear: readable, and the only path with a backward
  kernel      torch.ops.aten._weight_int8pack_mm(x (M, K), q (N, K), s (N,)) -> (M, N), on CPU
              and CUDA: reads the int8 weight directly, never an fp copy of it
The two give the same numbers up to float summation order (tests/test_quantize.py). On the CPU
torch's kernel is vectorised for bfloat16 activations only (AVX512-BF16); for fp32 it is a
scalar loop ~10x slower than fp32's own matmul (measured: 776 us vs 84 us for a 576x1536 layer,
one token), so fp32 layers take the reference path there unless told otherwise.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QMAX = 127  # symmetric: -128 is left out so that q and -q are both representable


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (N, K) int8, scales (N,)) for a weight (N, K); scales in the weight's dtype."""
    w = weight.detach().float()
    # A row of zeros would divide by zero: any positive scale represents it exactly.
    scales = (w.abs().amax(dim=1) / QMAX).clamp(min=1e-12)  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scales.to(weight.dtype)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.to(scales.dtype) * scales[:, None]  # (N, K)


def int8_kernel_available(device: torch.device, dtype: torch.dtype, any_dtype=False) -> bool:
    op = "aten::_weight_int8pack_mm"
    fast = device.type != "cpu" or dtype == torch.bfloat16 or any_dtype
    return fast and torch._C._dispatch_has_kernel_for_dispatch_key(op, device.type.upper())


class Int8Linear(nn.Module):
    """nn.Linear's interface (in_features, out_features, bias) over an int8 weight. The weight
    and scales are buffers, not parameters: they never train (LoRA adds what trains)."""

    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features,
                                                        dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)
        self.use_kernel = False  # set by quant/swap.py's use_kernels, for the device it is on

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        layer.weight_int8, layer.scales = quantize_int8(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.scales)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (a new tensor: writing to it changes nothing), for code that
        reads `.weight` (LoRALinear takes its dtype and device from it)."""
        return self.dequantize()

    def choose_kernel(self, any_dtype: bool = False) -> str:
        """The path forward takes on this layer's device and dtype (`any_dtype`: the kernel
        even where it is slow), by name."""
        self.use_kernel = int8_kernel_available(self.scales.device, self.scales.dtype, any_dtype)
        return "aten._weight_int8pack_mm" if self.use_kernel else "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The packed kernel has no backward: whenever a gradient must reach x (LoRA on this
        # base), the dequantised weight carries it.
        if self.use_kernel and not (torch.is_grad_enabled() and x.requires_grad):
            flat = x.reshape(-1, self.in_features).to(self.scales.dtype)  # (M, K)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
            out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., N)
        else:
            out = F.linear(x, self.dequantize().to(x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.use_kernel}")
