"""Whole-model sizes by name: plain dicts of overrides, one per sub-config (as gpt-fast's presets).

A training script's `--model-preset NAME` makes these the size flags' defaults, and
`--lm-preset NAME` the language model's shape from `transformer.PRESETS`; a flag given
explicitly still wins, and config.json saves the resolved sizes. Fields a preset leaves out keep
their dataclass defaults.
"""
from __future__ import annotations

from minivlm.models.seg_head import SegConfig
from minivlm.models.transformer import PRESETS as LM_PRESETS
from minivlm.models.transformer import TransformerConfig
from minivlm.models.vision import VisionConfig
from minivlm.models.vlm import ProjectorConfig, VLMConfig

MODEL_PRESETS: dict[str, dict[str, dict]] = {
    # demo.py's full recipe: the whole pipeline in about 10 minutes on a 2-core CPU.
    "demo": dict(
        lm=dict(dim=128, num_layers=4, num_heads=4, num_kv_heads=2, hidden_dim=384,
                max_seq_len=512),
        vision=dict(width=128, layers=3, head_width=32, patch_size=4)),
    # demo.py --quick and the training tests: every stage in seconds.
    "demo-quick": dict(
        lm=dict(dim=32, num_layers=1, num_heads=2, num_kv_heads=1, hidden_dim=64,
                max_seq_len=512),
        vision=dict(width=32, layers=1, head_width=16, patch_size=8),
        seg=dict(decoder_dim=16, decoder_mlp_dim=32)),
    # The tiny VLM the unit tests build (tests/conftest.py).
    "test": dict(
        lm=dict(dim=32, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=64,
                max_seq_len=512),
        vision=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
        projector=dict(kind="pixel_shuffle", merge=2),
        seg=dict(decoder_dim=16, decoder_heads=2, decoder_mlp_dim=32, iou_head_hidden_dim=16)),
}


def preset_overrides(model_preset: str = "", lm_preset: str = "") -> dict[str, dict]:
    """Field values by sub-config ("lm", "vision", "projector", "seg") that the named presets set;
    the LM preset's shape goes over the model preset's LM. "" names no preset."""
    for name, known in ((model_preset, MODEL_PRESETS), (lm_preset, LM_PRESETS)):
        if name and name not in known:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(known)}")
    sections = {part: dict(fields) for part, fields in MODEL_PRESETS.get(model_preset, {}).items()}
    if lm_preset:
        sections["lm"] = {**sections.get("lm", {}), **LM_PRESETS[lm_preset]}
    return sections


def preset_config(model_preset: str, lm_preset: str = "", seg: bool = False) -> VLMConfig:
    """The VLMConfig a preset describes; `seg` adds the segmentation head."""
    sections = preset_overrides(model_preset, lm_preset)
    return VLMConfig(lm=TransformerConfig(**sections.get("lm", {})),
                     vision=VisionConfig(**sections.get("vision", {})),
                     projector=ProjectorConfig(**sections.get("projector", {})),
                     seg=SegConfig(**sections.get("seg", {}), enabled=seg))
