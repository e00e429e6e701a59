"""Reading minivlm's own checkpoints: a step directory (or a run's `latest`) back into a model.

    step_000500/  config.json  model.safetensors  tokenizer/  ...
config.json holds every model config (what the builder needs to rebuild the model exactly) and
the LoRA settings; tensors come back through safetensors, so loading can never run code. Saving,
with the optimizer and RNG state a resume needs, is minivlm/train/checkpoint.py; while a save
replaces a step directory of the same name, `latest` may name a hidden copy (`.tmp_step_...`).
A file that is there but unusable (truncated, or a tokenizer bigger than the model's embedding)
raises CheckpointError naming it, never a library's traceback.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minivlm.data.tokenizer import load_tokenizer
from minivlm.errors import CheckpointError
from minivlm.lora import apply_lora, merge_and_unload
from minivlm.models.build import build_vlm_from_config
from minivlm.models.vlm import VLMConfig

LATEST = "latest"  # a run directory's pointer file: the name of its newest complete step


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (follows its `latest`) or a step directory -> the step directory."""
    path = Path(path)
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        if not (path / name / "config.json").is_file():
            raise ValueError(f"{path / LATEST}: names '{name}', which is missing or incomplete; "
                             f"pass one of the step directories of {path} instead")
        path = path / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"{path}: not a minivlm checkpoint (expected config.json and "
                         "model.safetensors, or a run directory with a 'latest' file)")
    return path


def read_config(ckpt_dir: Path) -> dict:
    try:
        return json.loads((ckpt_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{ckpt_dir / 'config.json'}: unreadable ({error})") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights strictly, naming the first tensor that is missing or mis-shaped."""
    try:
        state = load_file(str(path))
    except SafetensorError as error:  # a truncated or overwritten file
        raise CheckpointError(f"{path}: cannot read the weights ({error}); the file is truncated "
                              "or damaged") from None
    expected = model.state_dict()
    # Tied weights (embed_tokens / lm_head) share storage; save_model kept one of the names.
    aliases: dict[int, set[str]] = {}
    for name, tensor in expected.items():
        aliases.setdefault(tensor.data_ptr(), set()).add(name)
    for name, tensor in expected.items():
        if not aliases[tensor.data_ptr()] & state.keys():
            raise ValueError(f"{path}: missing tensor '{name}' {tuple(tensor.shape)}")
        if name in state and state[name].shape != tensor.shape:
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor '{unexpected[0]}' "
                         f"({len(unexpected)} in all) for this model config")
    model.load_state_dict(state, strict=False)


def load_vlm(path, device: str | torch.device = "cpu", merge_lora: bool = False):
    """(model, tokenizer, run_config) from a checkpoint directory or a run's `latest`.

    A LoRA checkpoint is rebuilt with its adapters (so training can resume); `merge_lora` folds
    them into plain weights instead, as the next stage or inference wants.
    """
    ckpt = resolve_checkpoint(path)
    run_config = read_config(ckpt)
    # The checkpoint holds every weight: none is fetched again. The config keeps naming where
    # the tower's weights first came from ("" = trained here from random).
    model = build_vlm_from_config(VLMConfig.from_dict(run_config["model"]),
                                  load_pretrained=False)
    lora = run_config.get("lora")
    if lora:
        apply_lora(model.lm, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                   targets=lora["targets"])
    load_weights(model, ckpt / "model.safetensors")
    if lora and merge_lora:
        merge_and_unload(model)
        run_config = dict(run_config, lora=None)
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    rows = model.config.lm.vocab_size
    # More rows than pieces is normal (real models pad the embedding); fewer would make any id
    # past the last row an IndexError deep inside the first forward pass.
    if tokenizer.vocab_size > rows:
        raise CheckpointError(f"{ckpt / 'tokenizer'}: {tokenizer.vocab_size} pieces, but the "
                              f"model's embedding has only {rows} rows; this tokenizer does not "
                              "belong to this checkpoint")
    return model.to(device), tokenizer, run_config
