"""Reading minivlm's own checkpoints: find a step directory (or a run's `latest`), read its files.

    step_000500/  config.json  model.safetensors  tokenizer/  ...
config.json holds every model config (what the builder needs to rebuild the model exactly) and
the LoRA settings; tensors come back through safetensors, so loading can never run code. Saving,
with the optimizer and RNG state a resume needs, is minivlm/train/checkpoint.py; while a save
replaces a step directory of the same name, `latest` may name a hidden copy (`.tmp_step_...`).
A file that is there but unusable (truncated, or a tokenizer bigger than the model's embedding)
raises CheckpointError naming it, never a library's traceback. The model itself is rebuilt by
`minivlm.load.load_vlm`, so this file needs nothing from minivlm.models.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minivlm.errors import CheckpointError

LATEST = "latest"  # a run directory's pointer file: the name of its newest complete step
# The files of one step directory, written by train/checkpoint.py and read here and in load.py.
RUN_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
TOKENIZER_DIR = "tokenizer"


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (follows its `latest`) or a step directory -> the step directory."""
    path = Path(path)
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        if not (path / name / RUN_CONFIG_FILE).is_file():
            raise ValueError(f"{path / LATEST}: names '{name}', which is missing or incomplete; "
                             f"pass one of the step directories of {path} instead")
        path = path / name
    if not (path / RUN_CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path}: not a minivlm checkpoint (expected config.json and "
                         "model.safetensors, or a run directory with a 'latest' file)")
    return path


def read_config(ckpt_dir: Path) -> dict:
    try:
        return json.loads((ckpt_dir / RUN_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{ckpt_dir / RUN_CONFIG_FILE}: unreadable ({error})") from None


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
