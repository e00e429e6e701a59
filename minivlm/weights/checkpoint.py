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


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Each tied parameter's later name -> its first name (lm_head.weight ->
    lm.embed_tokens.weight): one Parameter under two names, which a weights file stores once."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(param), name)
        if first != name:
            aliases[name] = first
    return aliases


def read_weights(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict for `model`, checked against its names and shapes (a
    sharded model's global shapes): a damaged file, or the first tensor that is missing,
    mis-shaped or unexpected, raises one line naming the file. A tied weight, saved under either
    of its names, comes back under both."""
    try:
        state = load_file(str(path))
    except SafetensorError as error:  # a truncated or overwritten file
        raise CheckpointError(f"{path}: cannot read the weights ({error}); the file is truncated "
                              "or damaged") from None
    for name, first in tied_names(model).items():
        stored = state.get(first, state.get(name))
        if stored is not None:
            state.setdefault(name, stored)
            state.setdefault(first, stored)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{path}: missing tensor '{name}' {shape}")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(state[name].shape)}, "
                             f"the model expects {shape}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor '{unexpected[0]}' "
                         f"({len(unexpected)} in all) for this model config")
    return state


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights strictly (read_weights names what does not fit)."""
    model.load_state_dict(read_weights(model, path))
