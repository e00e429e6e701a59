"""Which parameters train: the one place that decides it."""
from __future__ import annotations

from minivlm.models.vlm import VLM

PARTS = ("vision", "projector", "lm", "seg")


def set_trainable(model: VLM, parts: set[str]) -> None:
    """Freeze everything, then unfreeze the named parts (see PARTS)."""
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"--train: unknown part(s) {sorted(unknown)}; expected some of {PARTS}")
    model.requires_grad_(False)
    modules = dict(vision=model.vision, projector=model.projector, lm=model.lm,
                   seg=model.seg_head)
    for part in parts:
        if modules[part] is not None:
            modules[part].requires_grad_(True)
