"""The unit every reader yields: one conversation about zero or more images (and masks).

A `Sample` is format-free. Whatever the file looked like (LLaVA JSON, messages JSONL,
Chiron-o1 eval, ReasonSeg labelme), the rest of the pipeline sees the same three things:
the image paths, the chat turns with one "<image>" placeholder per image (in image order),
and one (H, W) mask per "[SEG]" the assistant says (in order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minivlm.constants import IMAGE_TOKEN, MASK_VALUES, ROLES, SEG_TOKEN


@dataclass
class Sample:
    images: list[Path]  # resolved image paths, in placeholder order
    turns: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}]
    masks: list[np.ndarray] = field(default_factory=list)  # one (H, W) uint8 per [SEG]
    source: str = ""  # "path/to/file.json:17", used in every error message
    meta: dict = field(default_factory=dict)  # id, answer, answer_type, task, ...


def check_sample(sample: Sample) -> None:
    """Raise a one-line ValueError (prefixed with `sample.source`) if the sample breaks the
    contract.

    Readers call this on every record; code that builds samples on the fly can call it too.
    """
    where = sample.source or "<sample>"
    if not isinstance(sample.turns, list) or not sample.turns:
        raise ValueError(f"{where}: expected a non-empty list of turns")
    for i, turn in enumerate(sample.turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise ValueError(f"{where}: turn {i}: expected a role in {ROLES}, found {turn!r:.80}")
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: turn {i}: expected string content, "
                             f"found {type(turn.get('content')).__name__}")
    roles = [t["role"] for t in sample.turns]
    if "user" not in roles or "assistant" not in roles:
        raise ValueError(f"{where}: expected at least one user and one assistant turn, "
                         f"found roles {roles}")

    # The model splices image i's embeddings at the i-th placeholder: counts must agree exactly.
    num_placeholders = sum(t["content"].count(IMAGE_TOKEN) for t in sample.turns)
    if num_placeholders != len(sample.images):
        raise ValueError(
            f"{where}: {num_placeholders} {IMAGE_TOKEN} placeholder(s) in the text "
            f"but {len(sample.images)} image(s) listed"
        )
    if any(IMAGE_TOKEN in t["content"] for t in sample.turns if t["role"] == "assistant"):
        raise ValueError(f"{where}: {IMAGE_TOKEN} in an assistant turn "
                         "(images belong to user turns)")

    # The mask loss pairs the hidden state at the k-th [SEG] with the k-th mask.
    num_seg = sum(t["content"].count(SEG_TOKEN) for t in sample.turns if t["role"] == "assistant")
    if num_seg != len(sample.masks):
        raise ValueError(f"{where}: {num_seg} {SEG_TOKEN} in the answer(s) "
                         f"but {len(sample.masks)} mask(s)")
    for k, mask in enumerate(sample.masks):
        if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.uint8:
            raise ValueError(f"{where}: mask {k}: expected an (H, W) uint8 array")
        # The mask losses would read any other value as background without a word (the IoU
        # refuses it, but only at eval time): stop at the record instead.
        unexpected = np.setdiff1d(np.unique(mask), MASK_VALUES)
        if unexpected.size:
            raise ValueError(f"{where}: mask {k}: expected pixel values in {MASK_VALUES} "
                             f"(background, object, ignore), found {unexpected[:5].tolist()}")
