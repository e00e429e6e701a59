"""Checking tensors read from a weight file against the model they are meant for.

Shared by the Hugging Face and GGUF readers (through `Transformer.from_state_dict`), so that both
turn a wrong file into the same one-line errors: which tensor is missing, extra or mis-shaped.
"""
from __future__ import annotations

import torch


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     tie_embeddings: bool, source: str) -> dict[str, torch.Tensor]:
    """`state` ready for a strict `load_state_dict` against `expected` (the model's own state
    dict), after checking every name and shape; `source` names the file in errors.

    A tied model may omit lm_head.weight (HF does when saving) or carry a copy equal to the
    embedding.
    """
    state = dict(state)
    if tie_embeddings:
        head = state.pop("lm_head.weight", None)
        embed = state.get("embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise ValueError(f"{source}: lm_head.weight differs from embed_tokens.weight, "
                             "but the config says the embeddings are tied")
        if embed is not None:
            state["lm_head.weight"] = embed
    num_layers = len({name.split(".")[1] for name in expected if name.startswith("layers.")})
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"{source}: unexpected tensor {name!r} (not part of a "
                             f"{num_layers}-layer model with this config)")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[name].shape)} from the config")
    missing = [name for name in expected if name not in state]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return state
