"""LoRA (Hu et al. 2021, arXiv:2106.09685), applied to a built model by swapping its Linears.

A frozen weight W gets a trainable low-rank update: y = W x + (alpha / r) * B A dropout(x), with
A (r, in) Kaiming-uniform and B (out, r) zero, so training starts from the unchanged model.
The model files know nothing of this: `apply_lora` replaces matching Linears by `LoRALinear`.

Attribute names copy PEFT's LoraLayer (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), so our
state-dict keys and PEFT's differ by a prefix only: minivlm/weights/peft.py reads and writes
adapters in PEFT's on-disk format. Which parameters a training stage trains beside the adapters
is decided in minivlm/train/trainable.py.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from minivlm.quant.swap import QUANTIZED_LAYERS

# Shorthands accepted in `targets`, besides "all-linear", "projector" and "re:<regex>".
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus B(A(dropout(x))) * alpha / r, as PEFT's lora.Linear computes it."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRALinear: rank r must be positive, got r={r}")
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        like = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **like)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **like)
        # PEFT's default init (from loralib): A as nn.Linear's own init, B zero -> delta W = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False  # True while B A * scaling is folded into base_layer.weight

    @property
    def weight(self) -> torch.Tensor:  # code that reads `proj.weight` (dtype, device) still works
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        # In fp32, then cast: a bf16 product of two small factors would lose the update.
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in)
        return (delta * self.scaling).to(self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:  # the update is already inside base_layer.weight
            return result
        # PEFT scales B's output; scaling the r-wide A output is the same up to rounding and
        # multiplies r columns instead of out_features.
        return result + self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


# ---- choosing and wrapping Linears ----------------------------------------------------------

def adaptable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear a LoRA could wrap, by full module name: quantised ones too (QLoRA: the
    adapter trains in the compute dtype beside the frozen int8/int4 base, minivlm/quant/).

    Skips layers already inside a LoRALinear, and nn.MultiheadAttention's out_proj, whose weight
    torch reads directly (F.multi_head_attention_forward) so a wrapper would be bypassed.
    """
    skip = tuple(f"{name}." for name, m in model.named_modules()
                 if isinstance(m, (LoRALinear, nn.MultiheadAttention)))
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear,) + QUANTIZED_LAYERS) and not name.startswith(skip)}


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if pattern == "all-linear":  # as PEFT: every Linear except the output layer
        return name.split(".")[-1] != "lm_head"
    if pattern == "projector":
        return "projector" in name.split(".")
    if pattern in TARGET_GROUPS:
        return any(target_matches(name, p) for p in TARGET_GROUPS[pattern])
    return name == pattern or name.endswith("." + pattern)  # PEFT's rule for target_modules


def summarize_names(names) -> str:
    """Layer numbers collapsed ("layers.N.mlp.up_proj"), so 30 layers list as one line each."""
    unique = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".N", n) for n in names))
    shown = ", ".join(unique[:24])
    return shown + (f", ... (+{len(unique) - 24} more)" if len(unique) > 24 else "")


def find_lora_targets(model: nn.Module, targets) -> list[str]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    linears = adaptable_linears(model)
    chosen = set()
    for pattern in targets:
        matched = {n for n in linears if target_matches(n, pattern)}
        if not matched:
            raise ValueError(f"apply_lora: target {pattern!r} matches no nn.Linear; the model's "
                             f"Linear modules are: {summarize_names(linears) or '(none)'}")
        chosen |= matched
    return [n for n in linears if n in chosen]  # model order


def freeze_all_but_lora(model: nn.Module) -> None:
    """Only the adapters train, as in a model PEFT's get_peft_model returns."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)


def wrap_linears(model: nn.Module, names, r: int, alpha: float, dropout: float) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> nn.Module:
    """Wraps the Linears named by `targets` in place and freezes every other parameter.

    A target is a module name or its last components ("q_proj", "mlp.up_proj"), a group ("attn",
    "mlp", "all-linear", "projector": the VLM projector's Linears) or "re:<regex>" matched in full
    against the module name ("re:layers\\.[0-3]\\..*"). A training stage then decides what else
    trains (minivlm.train.trainable).
    """
    wrap_linears(model, find_lora_targets(model, targets), r, alpha, dropout)
    freeze_all_but_lora(model)
    return model


# ---- merging ---------------------------------------------------------------------------------

def _check_not_tied(model: nn.Module) -> None:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, m in lora_modules(model).items():
        if isinstance(m.base_layer, QUANTIZED_LAYERS):
            raise ValueError(f"merge_lora: {name}'s base is {m.base_layer.scheme}-quantised; "
                             "the update would be rounded away: keep the adapter unmerged, or "
                             "load it onto the fp32 model")
        names = owners[id(m.base_layer.weight)]
        if len(names) > 1:
            raise ValueError(f"merge_lora: {name}'s weight is tied to {names}; merging would "
                             f"change them too (untie it, or keep the adapter unmerged)")


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """W <- W + B A * scaling in every LoRALinear; forward then skips the adapter branch (so the
    adapters get no gradient until `unmerge_lora`)."""
    _check_not_tied(model)
    for m in lora_modules(model).values():
        if not m.merged:
            m.base_layer.weight += m.delta_weight()
            m.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtracts the update again (restores W up to float rounding: ~1 ulp of the weight)."""
    for m in lora_modules(model).values():
        if m.merged:
            m.base_layer.weight -= m.delta_weight()
            m.merged = False
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges, then puts the plain Linears back: the model's keys are the original ones again."""
    merge_lora(model)
    for name, m in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base_layer)
    return model
