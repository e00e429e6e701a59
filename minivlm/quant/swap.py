"""Quantising a built model: its nn.Linears swapped for Int8Linear / Int4Linear (gpt-fast's
`replace_linear_weight_only_int8_per_channel`); the model files know nothing of it.

    quantize_model(model, "int4", group_size=64)          # the LM's Linears (a VLM's, or a
                                                          # bare Transformer's)
    quantize_model(vlm, "int8", include_vision=True)      # and the vision tower's
What stays as it is, and why:
  - embeddings, norms, the projector and the mask head: small, or (the embedding) a lookup table
    that no matmul kernel reads; they keep the compute dtype
  - a Linear whose weight *is* an embedding's (a tied lm_head): quantising it would store the
    table twice, so it stays tied, stored once
  - Linears inside nn.MultiheadAttention (open_clip's `out_proj`): torch reads `out_proj.weight`
    directly (F.multi_head_attention_forward), so a swapped module would be bypassed
The packed kernels are chosen per layer for the device the model is on (`use_kernels`), so move
the model first; training keeps `kernels=False` (the kernels have no backward).
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn as nn

from minivlm.quant.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES, Int4Linear
from minivlm.quant.int8 import Int8Linear

SCHEMES = ("int8", "int4")
QUANTIZED_LAYERS = (Int8Linear, Int4Linear)


def add_quantize_args(parser: argparse.ArgumentParser) -> None:
    """`--quantize` and `--quantize-group-size`, as every script that can quantise takes them."""
    parser.add_argument("--quantize", default="", choices=("",) + SCHEMES,
                        help="weight-only int8 (per channel) or int4 (per group) for the LM")
    parser.add_argument("--quantize-group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        choices=GROUP_SIZES, help="int4: input columns per scale and zero")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}


def _roots(model: nn.Module, include_vision: bool) -> list[tuple[str, nn.Module]]:
    """(prefix, module) of the parts to quantise: a VLM's LM (and tower), else the model."""
    if not hasattr(model, "lm"):
        if include_vision:
            raise ValueError("quantize_model: include_vision=True, but this model has no "
                             "vision tower (`model.vision`)")
        return [("", model)]
    return [("lm.", model.lm)] + ([("vision.", model.vision)] if include_vision else [])


def target_linears(model: nn.Module, include_vision: bool = False) -> tuple[dict, list[str]]:
    """({full name: nn.Linear} to quantise, [names kept as they are, with the reason])."""
    targets, kept = {}, []
    for prefix, root in _roots(model, include_vision):
        tables = {id(m.weight) for m in root.modules() if isinstance(m, nn.Embedding)}
        skip = tuple(f"{name}." for name, m in root.named_modules()
                     if isinstance(m, nn.MultiheadAttention) or hasattr(m, "lora_A"))
        for name, m in root.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            if name.startswith(skip):
                if isinstance(root.get_submodule(name.rsplit(".", 1)[0]), nn.MultiheadAttention):
                    kept.append(f"{prefix}{name} (read directly by nn.MultiheadAttention)")
                elif name.endswith(("lora_A", "lora_B")):
                    raise ValueError(f"quantize_model: {prefix}{name} is a LoRA adapter; "
                                     "quantise the base model first, then apply_lora")
            elif id(m.weight) in tables:
                kept.append(f"{prefix}{name} (tied to the embedding, stored once)")
            else:
                targets[prefix + name] = m
    return targets, kept


def check_group_size(targets: dict[str, nn.Linear], group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--quantize-group-size {group_size}: expected one of "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    for name, m in targets.items():
        if m.in_features % group_size:
            fits = [g for g in GROUP_SIZES if all(t.in_features % g == 0
                                                  for t in targets.values())]
            raise ValueError(f"--quantize-group-size {group_size} does not divide {name}'s "
                             f"{m.in_features} input columns; use "
                             f"{' or '.join(map(str, fits)) or 'int8'}")


def quantize_model(model: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                   include_vision: bool = False, kernels: bool = True,
                   verbose: bool = True) -> nn.Module:
    """Swaps the target Linears in place (every check runs before the first swap) and, with
    `kernels`, lays them out for torch's packed kernels on their device."""
    if scheme not in SCHEMES:
        raise ValueError(f"--quantize {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if quantized_layers(model):
        raise ValueError("quantize_model: this model is quantised already")
    targets, kept = target_linears(model, include_vision)
    if not targets:
        raise ValueError(f"quantize_model: no nn.Linear layers to quantise as {scheme} "
                         f"(kept as they are: {', '.join(kept) or 'none'})")
    if scheme == "int4":
        check_group_size(targets, group_size)
    for name, linear in targets.items():
        parent, _, child = name.rpartition(".")
        layer = (Int8Linear.from_linear(linear) if scheme == "int8"
                 else Int4Linear.from_linear(linear, group_size))
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if verbose:
        groups = f" (group {group_size})" if scheme == "int4" else ""
        print(f"quantize_model: {scheme}{groups} on {len(targets)} Linear layers; kept: "
              f"{'; '.join(kept) or 'none'}")
    if kernels:
        use_kernels(model, verbose)
    return model


def use_kernels(model: nn.Module, verbose: bool = True, any_dtype: bool = False) -> dict:
    """Each quantised layer picks torch's packed kernel for its device and dtype when one fits
    and is fast (on a CPU: bfloat16 only; `any_dtype` takes it anyway), else the reference
    path; prints and returns how many layers took which path."""
    chosen = Counter(layer.choose_kernel(any_dtype)
                     for layer in quantized_layers(model).values())
    if verbose and chosen:
        first = next(iter(quantized_layers(model).values()))
        qparams = first.scales if isinstance(first, Int8Linear) else first.scales_and_zeros
        device, dtype = qparams.device, qparams.dtype
        paths = ", ".join(f"{path} x{count}" for path, count in chosen.items())
        print(f"quantized matmul on {device}: {paths}"
              + (" (torch's CPU kernels are fast in bfloat16 only)"
                 if device.type == "cpu" and dtype != torch.bfloat16 and not any_dtype else ""))
    return dict(chosen)


def prepare_quantized(model: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                      verbose: bool = True) -> nn.Module:
    """For inference scripts (`--quantize`): a checkpoint quantised already only gets its kernels
    (and must match `scheme` if one is asked for); a plain one is quantised now."""
    layers = quantized_layers(model)
    if layers:
        stored = next(iter(layers.values())).scheme
        if scheme and scheme != stored:
            raise ValueError(f"--quantize {scheme}: this checkpoint is quantised as {stored} "
                             f"already; pass --quantize {stored} or leave the flag out")
        use_kernels(model, verbose)
    elif scheme:
        quantize_model(model, scheme, group_size, verbose=verbose)
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of what a checkpoint stores, each tensor once (a tied one too), without buffers
    that are a function of the config (rotary tables): {'quantized': the quantised layers,
    scales and zeros included; 'other': everything else; 'total'}."""
    stored = list(model.parameters())
    for module in model.modules():
        stored += [b for name, b in module._buffers.items()
                   if b is not None and name not in module._non_persistent_buffers_set]
    inside = {id(t) for m in quantized_layers(model).values() for t in m.buffers()}
    sizes = {"quantized": 0, "other": 0}
    for tensor in {id(t): t for t in stored}.values():
        sizes["quantized" if id(tensor) in inside else "other"] += \
            tensor.numel() * tensor.element_size()
    return sizes | {"total": sizes["quantized"] + sizes["other"]}


def dequantized_copy_bytes(model: nn.Module) -> int:
    """What the quantised layers would take in fp32: the baseline their bytes compare with."""
    return sum(m.in_features * m.out_features * torch.finfo(torch.float32).bits // 8
               for m in quantized_layers(model).values())
