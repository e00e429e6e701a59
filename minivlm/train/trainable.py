"""Which parameters train: the one place that decides it, and the table every script prints.

A stage names parts of the VLM (`--train`, or "auto": the stage's own parts plus any part that
starts from random weights); `--vision-freeze` keeps the tower out, and SAM's image encoder
(`--seg-image-encoder sam`) never trains. With LoRA adapters on the
language model (LISA's recipe) its own weights stay frozen under them, and the modules named by
`--lora-train-extra` train in full beside them.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from minivlm.lora import freeze_all_but_lora, lora_modules
from minivlm.models.vlm import VLM

PARTS = ("vision", "projector", "lm", "seg")
# What LISA trains in full beside the LM's adapters, and so train_seg.py's --lora-train-extra:
# the [SEG] projection, the mask decoder and its image input, and the rows of the new tokens
# (<image>, [SEG]) in the embeddings and the output layer.
SEG_LORA_EXTRAS = ("text_hidden_fcs", "mask_decoder", "image_to_mask", "similarity_prompt",
                   "lm_head", "embed_tokens")


def _part_modules(model: VLM) -> dict[str, nn.Module | None]:
    return dict(vision=model.vision, projector=model.projector, lm=model.lm, seg=model.seg_head)


def _matches_extra(param_name: str, extra: str) -> bool:
    return f".{extra}." in f".{param_name}."  # whole name components: "lm.lm_head.weight"


def mark_trainable(model: nn.Module, extra: str | Iterable[str] = SEG_LORA_EXTRAS
                   ) -> tuple[int, int]:
    """LoRA weights and the parameters under modules named in `extra` train; the rest is frozen.

    Names absent from the model are skipped (a bare Transformer has no mask_decoder). A tied
    lm_head/embed_tokens is one tensor: naming either trains both. Returns (trainable, total).
    """
    extra = (extra,) if isinstance(extra, str) else tuple(extra)
    freeze_all_but_lora(model)
    # remove_duplicate=False: a tied weight is listed under both of its names.
    for name, p in model.named_parameters(remove_duplicate=False):
        if any(_matches_extra(name, e) for e in extra):
            p.requires_grad_(True)
    return count_parameters(model)


def set_trainable(model: VLM, train: str = "auto", *, stage_parts: Iterable[str] = (),
                  pretrained: Iterable[str] = PARTS, lora_extras: Iterable[str] = ()) -> set[str]:
    """Freeze everything, then train what the stage asks for; returns the parts trained.

    train: "auto", or a comma list of PARTS. "auto" = `stage_parts` plus every part not in
    `pretrained` (random weights have to learn whatever the stage). Apply LoRA to `model.lm`
    first: its adapters then train instead of the LM's weights, and `lora_extras` train in full.
    """
    if train == "auto":
        parts = set(stage_parts) | ({"vision", "projector", "lm"} - set(pretrained))
    else:
        parts = set(filter(None, train.split(",")))
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"--train: unknown part(s) {sorted(unknown)}; expected some of {PARTS}")
    if model.config.vision.freeze:  # --vision-freeze wins over "auto" and --train
        parts.discard("vision")
    adapted = bool(lora_modules(model.lm))
    mark_trainable(model, lora_extras if adapted else ())
    modules = _part_modules(model)
    for part in parts:
        if modules[part] is not None and not (part == "lm" and adapted):
            modules[part].requires_grad_(True)
    if "projector" in parts and model.image_positions is not None:  # the image tokens' input
        model.image_positions.requires_grad_(True)
    if getattr(model.seg_head, "image_encoder", None) is not None:
        model.seg_head.image_encoder.requires_grad_(False)  # SAM's ViT stays frozen, as in LISA
    return {part for part in parts if modules[part] is not None}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of scalars; a tied tensor counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _row(name: str) -> str:
    if name.startswith("lm.") and (".lora_A." in name or ".lora_B." in name):
        return "lm LoRA adapters"
    if name.startswith("seg_head.image_encoder."):
        return "SAM image encoder"
    return {"seg_head": "seg head"}.get(name.split(".")[0], name.split(".")[0])


def trainable_table(model: VLM) -> str:
    """Trainable / total parameters per module, one line each, then the sum."""
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():  # a tied tensor is listed (and counted) once
        counts = rows.setdefault(_row(name), [0, 0])
        counts[0] += p.numel() if p.requires_grad else 0
        counts[1] += p.numel()
    trainable, total = count_parameters(model)
    lines = [f"  {'module':18s} {'trainable':>12s} {'total':>12s}"]
    lines += [f"  {row:18s} {t:12,d} {n:12,d}" for row, (t, n) in rows.items()]
    lines.append(f"  {'all':18s} {trainable:12,d} {total:12,d}  "
                 f"({100 * trainable / max(1, total):.1f}% trainable)")
    return "\n".join(lines)
