"""LoRA adapters in PEFT's on-disk format: adapter_config.json + adapter_model.safetensors.

`save_peft_adapter` writes what `PeftModel.from_pretrained(llama, path)` loads onto the Hugging
Face model that `Transformer.to_hf` exports; `load_peft_adapter` reads an adapter saved by
`get_peft_model(...).save_pretrained` onto our model. Our LoRALinear copies PEFT's attribute names
(`base_layer`, `lora_A`, `lora_B`), so the tensor names differ by a prefix only:
    ours  layers.0.self_attn.q_proj.lora_A.weight
    PEFT  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minivlm.files import atomic_path, write_json_atomic
from minivlm.lora import (LoRALinear, adaptable_linears, freeze_all_but_lora, lora_modules,
                          summarize_names, target_matches, wrap_linears)

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> LlamaForCausalLM


def _is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _is_language_model(module: nn.Module) -> bool:
    # Recognised by its Llama parameter names (a Transformer, or any model named like one), so
    # this format module needs nothing from minivlm.models.
    return hasattr(module, "embed_tokens") and hasattr(module, "layers")


def _lm_prefix(model: nn.Module, prefix: str | None) -> str:
    """Where the language model sits: "" for a Transformer, "lm." for VLM's `vlm.lm`."""
    if prefix is not None:
        return prefix
    if _is_language_model(model):
        return ""
    found = [n for n, m in model.named_modules() if _is_language_model(m)]
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
        warnings.warn(f"save_peft_adapter: LoRA outside the LM ({summarize_names(outside)}) is "
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
    write_json_atomic(path / "adapter_config.json", config)
    with atomic_path(path / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


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

    wrap_linears(model, [n for n in adapters if not isinstance(model.get_submodule(n), LoRALinear)],
          r, alpha, dropout)
    freeze_all_but_lora(model)
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
