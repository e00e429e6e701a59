"""Weight-only int4: asymmetric, one scale and zero per group of `group_size` input columns.

Per group of g weights (torchao / gpt-fast's `get_group_qparams`, tinygemm's convention):
    s = (max - min) / 15,  q = round((w - min) / s) in [0, 15],  w ~ (q - 8) * s + zero
with zero = min + 8 * s, so every weight is off by at most s / 2 = (max - min) / 30. Scales and
zeros sit in one (K / g, N, 2) tensor in the compute dtype, the layout torch's kernels read.
On disk and in the reference path, q is two nibbles per byte: byte = q[:, 2i] << 4 | q[:, 2i+1],
(N, K / 2) uint8 (also what `_convert_weight_to_int4pack` takes on CUDA). The kernels want their
own tiled layout, built once by `choose_kernel` on the layer's device:
  cpu   aten._convert_weight_to_int4pack_for_cpu(q (N, K) int32, 1) then
        aten._weight_int4pack_mm_for_cpu(x (M, K), packed, g, scales_and_zeros) -> (M, N)
        (N a multiple of 16; fp32/bf16/fp16, but vectorised for bf16 only: fp32 is ~20x slower
        than fp32's own matmul, so fp32 layers keep the reference path unless told otherwise)
  cuda  aten._convert_weight_to_int4pack(nibbles, inner_k_tiles) then aten._weight_int4pack_mm
        (bf16 only; K a multiple of 16 * inner_k_tiles)
Unpacking a kernel layout (for a state dict or a backward) multiplies the identity by it, with
scale 1 and zero 8, which gives q exactly: torchao's `get_plain` does the same.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUP_SIZES = (32, 64, 128)  # SmolLM2's width 576 divides by 32 and 64, not 128
DEFAULT_GROUP_SIZE = 64
QMAX = 15


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (N, K) uint8 in [0, 15], scales_and_zeros (K / g, N, 2)) for a weight (N, K)."""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    scales = ((high - low) / QMAX).clamp(min=1e-12)  # a constant group: any scale is exact
    q = torch.round((w - low[..., None]) / scales[..., None]).clamp(0, QMAX)
    zeros = low + scales * 8  # zero of (q - 8): tinygemm centres q on 8
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1)  # (G, N, 2)
    return q.reshape(N, K).to(torch.uint8), scales_and_zeros.contiguous().to(weight.dtype)


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    G = scales_and_zeros.shape[0]
    scales, zeros = scales_and_zeros.transpose(0, 1).unbind(-1)  # (N, G) each
    groups = q.reshape(N, G, K // G).to(scales.dtype)  # (N, G, g)
    return ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(N, K)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N, K / 2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)


def _inner_k_tiles(K: int) -> int | None:
    return next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)


def kernel_for(device: torch.device, dtype: torch.dtype, N: int, K: int,
               any_dtype: bool = False) -> str | None:
    """The name of the int4 kernel that can run this layer here, or None (reference path)."""
    if device.type == "cpu" and N % 16 == 0 and (dtype == torch.bfloat16 or any_dtype):
        return "aten._weight_int4pack_mm_for_cpu"
    if device.type == "cuda" and dtype == torch.bfloat16 and N % 8 == 0 and _inner_k_tiles(K):
        return "aten._weight_int4pack_mm"
    return None


class Int4Linear(nn.Module):
    """nn.Linear's interface over an int4 weight: buffers `weight_int4` (nibbles, or the
    kernel's layout once `choose_kernel` found one) and `scales_and_zeros`."""

    scheme = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, \
            group_size
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2,
                                                        dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(
            in_features // group_size, out_features, 2, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device)
                             if bias else None)
        self.kernel: str | None = None  # the kernel whose layout weight_int4 holds

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    group_size=group_size, dtype=linear.weight.dtype,
                    device=linear.weight.device)
        q, layer.scales_and_zeros = quantize_int4(linear.weight, group_size)
        layer.weight_int4 = pack_nibbles(q)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    # ---- layouts ------------------------------------------------------------------------------

    def _kernel_mm(self, x: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        op = (torch.ops.aten._weight_int4pack_mm_for_cpu if self.kernel.endswith("_for_cpu")
              else torch.ops.aten._weight_int4pack_mm)
        return op(x, self.weight_int4, self.group_size, scales_and_zeros)

    def nibble_values(self) -> torch.Tensor:
        """q (N, K) uint8, from whichever layout the layer holds."""
        if self.kernel is None:
            return unpack_nibbles(self.weight_int4)
        dtype = self.scales_and_zeros.dtype
        eye = torch.eye(self.in_features, dtype=dtype, device=self.weight_int4.device)
        identity_qparams = torch.empty_like(self.scales_and_zeros)
        identity_qparams[..., 0], identity_qparams[..., 1] = 1, 8  # (q - 8) * 1 + 8 = q
        return self._kernel_mm(eye, identity_qparams).t().round().to(torch.uint8)  # (N, K)

    def choose_kernel(self, any_dtype: bool = False) -> str:
        """Lays weight_int4 out for a kernel of this device and dtype when there is one
        (`any_dtype`: even where it is slow); returns its name or 'reference'."""
        if self.kernel is not None:
            return self.kernel
        device, dtype = self.weight_int4.device, self.scales_and_zeros.dtype
        kernel = kernel_for(device, dtype, self.out_features, self.in_features, any_dtype)
        if kernel is None:
            return "reference"
        if device.type == "cpu":
            q = unpack_nibbles(self.weight_int4).to(torch.int32)  # (N, K)
            self.weight_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        else:
            self.weight_int4 = torch.ops.aten._convert_weight_to_int4pack(
                self.weight_int4, _inner_k_tiles(self.in_features))
        self.kernel = kernel
        return kernel

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel is not None:  # files hold the portable nibbles, never a kernel's tiles
            destination[prefix + "weight_int4"] = pack_nibbles(self.nibble_values())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        kernel, self.kernel = self.kernel, None
        if kernel is not None:  # load nibbles, then lay them out for the kernel again
            self.weight_int4 = torch.empty(self.out_features, self.in_features // 2,
                                           dtype=torch.uint8, device=self.weight_int4.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if kernel is not None:
            self.choose_kernel(any_dtype=True)

    # ---- compute ------------------------------------------------------------------------------

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.nibble_values(), self.scales_and_zeros)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (a new tensor: writing to it changes nothing)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.weight_int4.device.type:
            raise ValueError(f"Int4Linear: weights on {self.weight_int4.device}, input on "
                             f"{x.device}; move the model before quantising it")
        # No backward through the kernel: a gradient for x goes through the dequantised weight.
        if self.kernel is not None and not (torch.is_grad_enabled() and x.requires_grad):
            flat = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)  # (M, K)
            out = self._kernel_mm(flat, self.scales_and_zeros)  # (M, N)
            out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            out = F.linear(x, self.dequantize().to(x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, kernel={self.kernel or 'reference'}")
