"""LoRA (Hu et al. 2021, arXiv:2106.09685), applied to a built model by swapping its Linears.

A frozen weight W gets a trainable low-rank update: y = W x + (alpha / r) * B A dropout(x), with
A (r, in) Kaiming-uniform and B (out, r) zero, so training starts from the unchanged model.
The model files know nothing of this: `apply_lora` replaces matching Linears by `LoRALinear`.

Attribute names copy PEFT's LoraLayer (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), so our
state-dict keys and PEFT's differ by a prefix only, and adapters are saved and loaded in PEFT's
on-disk format (adapter_config.json + adapter_model.safetensors) for HF's LlamaForCausalLM.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

# Shorthands accepted in `targets`, besides "all-linear", "projector" and "re:<regex>".
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
# Modules that train_seg.py trains beside the adapters (LISA): new-token rows, [SEG] head, decoder.
DEFAULT_EXTRAS = ("lm_head", "embed_tokens", "text_hidden_fcs", "mask_decoder")
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> LlamaForCausalLM


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
    """Every nn.Linear a LoRA could wrap, by full module name.

    Skips layers already inside a LoRALinear, and nn.MultiheadAttention's out_proj, whose weight
    torch reads directly (F.multi_head_attention_forward) so a wrapper would be bypassed.
    """
    skip = tuple(f"{name}." for name, m in model.named_modules()
                 if isinstance(m, (LoRALinear, nn.MultiheadAttention)))
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.startswith(skip)}


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


def _summarize_names(names) -> str:
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
                             f"Linear modules are: {_summarize_names(linears) or '(none)'}")
        chosen |= matched
    return [n for n in linears if n in chosen]  # model order


def _freeze_all_but_lora(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)


def _wrap(model: nn.Module, names, r: int, alpha: float, dropout: float) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> nn.Module:
    """Wraps the Linears named by `targets` in place and freezes every other parameter.

    A target is a module name or its last components ("q_proj", "mlp.up_proj"), a group ("attn",
    "mlp", "all-linear", "projector": the VLM projector's Linears) or "re:<regex>" matched in full
    against the module name ("re:layers\\.[0-3]\\..*"). Use `mark_trainable` to train more modules.
    """
    _wrap(model, find_lora_targets(model, targets), r, alpha, dropout)
    _freeze_all_but_lora(model)
    return model


def _matches_extra(param_name: str, extra: str) -> bool:
    return f".{extra}." in f".{param_name}."  # whole name components: "lm.lm_head.weight"


def mark_trainable(model: nn.Module, extra=DEFAULT_EXTRAS) -> tuple[int, int]:
    """LoRA weights and the parameters under modules named in `extra` train; the rest is frozen.

    Names absent from the model are skipped (a bare Transformer has no mask_decoder). A tied
    lm_head/embed_tokens is one tensor: naming either trains both. Returns (trainable, total).
    """
    extra = (extra,) if isinstance(extra, str) else tuple(extra)
    _freeze_all_but_lora(model)
    # remove_duplicate=False: a tied weight is listed under both of its names.
    for name, p in model.named_parameters(remove_duplicate=False):
        if any(_matches_extra(name, e) for e in extra):
            p.requires_grad_(True)
    return count_parameters(model)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of scalars; a tied tensor counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- merging ---------------------------------------------------------------------------------

def _check_not_tied(model: nn.Module) -> None:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, m in lora_modules(model).items():
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


# ---- adapter-only state dicts ----------------------------------------------------------------

def _is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def lora_state_dict(model: nn.Module, extras: bool = False) -> dict[str, torch.Tensor]:
    """The adapter weights by our names; with extras=True also every other trainable parameter."""
    state = model.state_dict()
    keys = [k for k in state if _is_lora_key(k)]
    if extras:
        keys += [n for n, p in model.named_parameters(remove_duplicate=False)
                 if p.requires_grad and not _is_lora_key(n)]
    return {k: state[k] for k in keys}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads what `lora_state_dict` returned into a model with the same adapters applied."""
    own = model.state_dict()
    missing = [k for k in own if _is_lora_key(k) and k not in state_dict]
    unknown = [k for k in state_dict if k not in own]
    if missing or unknown:
        raise ValueError(f"load_lora_state_dict: missing adapter keys {missing[:5]}, keys the "
                         f"model lacks {unknown[:5]} (apply_lora with the same targets first)")
    for k, v in state_dict.items():
        if v.shape != own[k].shape:
            raise ValueError(f"load_lora_state_dict: {k} has shape {tuple(v.shape)}, the model "
                             f"expects {tuple(own[k].shape)}")
    model.load_state_dict(state_dict, strict=False)


# ---- PEFT's on-disk format -------------------------------------------------------------------

def _lm_prefix(model: nn.Module, prefix: str | None) -> str:
    """Where the language model sits: "" for a Transformer, "lm." for VLM's `vlm.lm`."""
    if prefix is not None:
        return prefix
    from minivlm.models.transformer import Transformer
    if isinstance(model, Transformer):
        return ""
    found = [n for n, m in model.named_modules() if isinstance(m, Transformer)]
    if len(found) != 1:
        raise ValueError(f"PEFT adapter: found {len(found)} Transformer submodules {found}; "
                         f"pass prefix= (e.g. 'lm.')")
    return found[0] + "."


def _to_hf(name: str) -> str:  # HF's LlamaForCausalLM keeps lm_head outside its "model."
    return name if name.split(".")[0] == "lm_head" else "model." + name


def _from_hf(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def save_peft_adapter(model: nn.Module, path: str | Path,
                      base_model_name_or_path: str | None = None,
                      prefix: str | None = None) -> None:
    """Writes the LM's adapters (and its other trainable modules, as PEFT's modules_to_save) so
    that `PeftModel.from_pretrained(llama, path)` loads them onto the model `to_hf` exports.

    Only the language model goes in: a PEFT adapter for HF Llama has no place for a projector or
    mask decoder; those travel in the training checkpoint.
    """
    p = _lm_prefix(model, prefix)
    loras = lora_modules(model)
    inside = {n[len(p):]: m for n, m in loras.items() if n.startswith(p)}
    outside = [n for n in loras if not n.startswith(p)]
    if outside:
        warnings.warn(f"save_peft_adapter: LoRA outside the LM ({_summarize_names(outside)}) is "
                      f"not written; save it with the model checkpoint")
    if not inside:
        raise ValueError(f"save_peft_adapter: no LoRA modules under prefix {p!r}; apply_lora first")
    settings = {(m.r, m.alpha, getattr(m.lora_dropout, "p", 0.0)) for m in inside.values()}
    if len(settings) > 1:
        raise ValueError(f"save_peft_adapter: adapters differ in (r, alpha, dropout) {settings}; "
                         f"PEFT's LoraConfig holds one setting")
    (r, alpha, dropout), = settings

    tensors = {}
    for name, m in inside.items():
        for part in ("lora_A", "lora_B"):  # clone: safetensors refuses shared storage
            tensors[f"{PEFT_PREFIX}{_to_hf(name)}.{part}.weight"] = \
                getattr(m, part).weight.detach().clone().contiguous()

    # Other trainable modules of the LM (new-token embeddings, lm_head) -> modules_to_save.
    lm = model.get_submodule(p[:-1]) if p else model
    owners = []
    for name, param in lm.named_parameters(remove_duplicate=False):
        if param.requires_grad and not _is_lora_key(name):
            if ".base_layer." in f".{name}":
                raise ValueError(f"save_peft_adapter: {p}{name} is trainable inside a LoRA layer; "
                                 f"PEFT cannot store a trained base weight next to its adapter")
            owners.append(name.rpartition(".")[0])
    owners = list(dict.fromkeys(owners))
    hf_modules = [_to_hf(n) for n, _ in lm.named_modules() if n]
    modules_to_save = []
    for owner in owners:
        for key, value in lm.get_submodule(owner).state_dict().items():
            tensors[f"{PEFT_PREFIX}{_to_hf(owner)}.{key}"] = value.detach().clone().contiguous()
        # PEFT picks modules_to_save by `name.endswith(entry)`: the last name when that is unique
        # ("norm" would also pick every "input_layernorm"), else the full name.
        last = owner.split(".")[-1]
        unique = sum(n.endswith(last) for n in hf_modules) == 1
        modules_to_save.append(last if unique else _to_hf(owner))

    # target_modules: the leaf names when they pick exactly these Linears, else an exact regex.
    adapted = set(inside)
    candidates = set(adaptable_linears(lm)) | set(lora_modules(lm))
    leaves = sorted({n.split(".")[-1] for n in adapted})
    if {n for n in candidates if any(target_matches(n, leaf) for leaf in leaves)} == adapted:
        target_modules = leaves
    else:  # PEFT full-matches a string against module names
        target_modules = "(?:" + "|".join(re.escape(_to_hf(n)) for n in sorted(adapted)) + ")"

    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha,
                  lora_dropout=dropout, target_modules=target_modules, bias="none",
                  fan_in_fan_out=False, modules_to_save=modules_to_save or None,
                  base_model_name_or_path=base_model_name_or_path, init_lora_weights=True,
                  inference_mode=True, use_rslora=False, use_dora=False)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


# Config fields (PEFT's names) whose non-default values change the arithmetic.
_UNSUPPORTED = dict(use_dora=False, use_rslora=False, fan_in_fan_out=False, lora_bias=False,
                    rank_pattern={}, alpha_pattern={}, bias="none")


def load_peft_adapter(model: nn.Module, path: str | Path, prefix: str | None = None) -> nn.Module:
    """Reads a PEFT LoRA adapter (e.g. from `get_peft_model(...).save_pretrained`) onto our model.

    The modules to wrap are read from the tensor names, so list and regex target_modules both
    work. Afterwards the adapters and the loaded modules_to_save train; everything else is frozen.
    """
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type={config.get('peft_type')!r}, expected 'LORA'")
    for field, default in _UNSUPPORTED.items():
        if config.get(field, default) not in (default, None):
            raise ValueError(f"{config_file}: {field}={config[field]!r} is not supported "
                             f"(minivlm.lora is plain LoRA; expected {default!r})")
    r, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0)
    p = _lm_prefix(model, prefix)
    tensors = load_file(str(weights_file))

    # Validate everything before touching the model.
    own_state = model.state_dict()
    adapters, extras = {}, {}  # our module name -> {"lora_A": t, "lora_B": t}; our key -> t
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{weights_file}: tensor {key} does not start with {PEFT_PREFIX!r}")
        hf_name = key[len(PEFT_PREFIX):]
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", hf_name)
        if match is None:
            ours = p + _from_hf(hf_name)
            if ours not in own_state:
                raise ValueError(f"{weights_file}: tensor {key} has no counterpart {ours!r} in the "
                                 f"model")
            expected = tuple(own_state[ours].shape)
            extras[ours] = value
        else:
            module_name, part = p + _from_hf(match.group(1)), match.group(2)
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                module = None
            if not isinstance(module, (nn.Linear, LoRALinear)):
                raise ValueError(f"{weights_file}: tensor {key} targets {module_name!r}, which is "
                                 f"not an nn.Linear in the model")
            base = module.base_layer if isinstance(module, LoRALinear) else module
            expected = (r, base.in_features) if part == "lora_A" else (base.out_features, r)
            adapters.setdefault(module_name, {})[part] = value
        if tuple(value.shape) != expected:
            raise ValueError(f"{weights_file}: tensor {key} has shape {tuple(value.shape)}, "
                             f"but the model expects {expected}")
    tied: dict[int, str] = {}  # a tied lm_head/embed_tokens is one tensor: it holds one value
    for key, value in extras.items():
        first = tied.setdefault(own_state[key].data_ptr(), key)
        if first != key and not torch.equal(extras[first], value):
            raise ValueError(f"{weights_file}: {first} and {key} differ, but the model ties them "
                             f"into one tensor")
    incomplete = [n for n, parts in adapters.items() if len(parts) != 2]
    if incomplete:
        raise ValueError(f"{weights_file}: {incomplete[:3]} have only one of lora_A/lora_B")

    _wrap(model, [n for n in adapters if not isinstance(model.get_submodule(n), LoRALinear)],
          r, alpha, dropout)
    _freeze_all_but_lora(model)
    named = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, parts in adapters.items():
            module = model.get_submodule(name)
            for part, value in parts.items():
                getattr(module, part).weight.copy_(value)
            # An adapter applied before this call takes this file's alpha and dropout.
            module.alpha, module.scaling = alpha, alpha / r
            module.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for key, value in extras.items():
            own_state[key].copy_(value)
            if key in named:
                named[key].requires_grad_(True)
    return model
