"""Load an original SAM checkpoint (sam_vit_{b,l,h}_*.pth) whole, its encoder sized from shapes.

The released files are bare state dicts: `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`
and no configuration. The encoder's sizes are read back from tensor shapes
(`infer_sam_encoder_config`), so ViT-B/L/H and smaller SAM-shaped encoders all load; the
decoder (the same in every release) and the prompt encoder follow the given MaskDecoderConfig.
Loading is strict: every tensor is used, every shape checked, and the first disagreement is a
one-line ValueError naming the file and the key.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from minivlm.models.mask_decoder import MASK_DECODER_PRESETS, MaskDecoderConfig, check_tensors
from minivlm.models.prompt_encoder import NoMaskPromptEncoder
from minivlm.models.sam import Sam, SamConfig, SamEncoderConfig, build_sam_parts
from minivlm.models.sam_prompt_encoder import PromptEncoder

ENCODER_PREFIX = "image_encoder."


def infer_sam_encoder_config(
    state_dict: dict[str, Tensor], path: str | Path, prefix: str = ENCODER_PREFIX
) -> SamEncoderConfig:
    """The SamEncoderConfig whose ImageEncoderViT has these tensors (keys without `prefix`).

    embed_dim, patch_size, in_chans: patch_embed.proj.weight (E, in, p, p); img_size: the
    pos_embed grid x p; depth: the blocks; head_dim: rel_pos_h's width (num_heads = E / head_dim);
    per block, rel_pos_h has 2 * grid - 1 rows when the block is global, 2 * window - 1 when
    windowed; mlp_ratio: blocks.0.mlp.lin1.weight; out_chans: neck.0.weight. `prefix` only names
    the keys in errors.
    """

    def need(key: str, ndim: int) -> Tensor:
        if key not in state_dict:
            raise ValueError(f"{path}: missing key '{prefix}{key}' (needed to size the encoder)")
        if state_dict[key].ndim != ndim:
            raise ValueError(
                f"{path}: key '{prefix}{key}' has shape {tuple(state_dict[key].shape)}, "
                f"expected {ndim} dimensions"
            )
        return state_dict[key]

    embed_dim, in_chans, patch_size, patch_w = need("patch_embed.proj.weight", 4).shape
    grid = need("pos_embed", 4).shape[1]
    if patch_w != patch_size:
        raise ValueError(f"{path}: '{prefix}patch_embed.proj.weight' has non-square patches")
    found = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(found) + 1 if found else 0
    if found != set(range(depth)) or depth == 0:
        gap = min(set(range(depth)) - found, default=0)
        raise ValueError(f"{path}: no '{prefix}blocks.{gap}.*' keys (blocks must be 0..n-1)")

    global_attn_indexes, windows = [], set()
    head_dim = need("blocks.0.attn.rel_pos_h", 2).shape[1]
    for i in range(depth):
        rows = need(f"blocks.{i}.attn.rel_pos_h", 2).shape[0]
        if rows == 2 * grid - 1:
            global_attn_indexes.append(i)
        elif rows % 2 == 1:
            windows.add((rows + 1) // 2)
        else:
            raise ValueError(
                f"{path}: key '{prefix}blocks.{i}.attn.rel_pos_h' has {rows} rows; expected "
                f"2 * grid - 1 = {2 * grid - 1} (global) or 2 * window - 1 (windowed)"
            )
    if len(windows) > 1:
        raise ValueError(f"{path}: windowed blocks disagree on the window size {sorted(windows)}")
    if embed_dim % head_dim != 0:
        raise ValueError(
            f"{path}: rel_pos width {head_dim} (head_dim) does not divide embed_dim {embed_dim}"
        )
    window_size = windows.pop() if windows else 0
    return SamEncoderConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        mlp_ratio=need("blocks.0.mlp.lin1.weight", 2).shape[0] / embed_dim,
        window_size=window_size,
        # With no windowed block every block is global; SAM says so with window_size=0.
        global_attn_indexes=tuple(global_attn_indexes) if window_size else (),
        out_chans=need("neck.0.weight", 4).shape[0],
    )


def read_sam_state_dict(path: str | Path, mmap: bool = False) -> dict[str, Tensor]:
    """The tensors of a SAM .pth, or a one-line ValueError if the file is not one.

    mmap=True maps the file instead of reading it: only the tensors touched are read.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, UnicodeDecodeError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"{path}: not a PyTorch state_dict torch.load can read "
            f"({type(error).__name__}: {first_line})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path}: expected a state_dict (dict of tensors), found {type(state).__name__}"
        )
    if not any(key.startswith(ENCODER_PREFIX) for key in state):
        raise ValueError(
            f"{path}: no '{ENCODER_PREFIX}*' keys; expected an original SAM checkpoint "
            f"(sam_vit_b_01ec64.pth, ...)"
        )
    return state


def _encoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The `image_encoder.*` tensors, keys without the prefix (as ImageEncoderViT names them)."""
    return {key[len(ENCODER_PREFIX):]: value
            for key, value in state.items() if key.startswith(ENCODER_PREFIX)}


def read_sam_encoder_config(path: str | Path) -> SamEncoderConfig:
    """The encoder sizes of a SAM checkpoint, from its shapes alone (memory-mapped: nothing of a
    2.5 GB file is read but the headers of the tensors looked at)."""
    return infer_sam_encoder_config(_encoder_state(read_sam_state_dict(path, mmap=True)), path)


def load_sam(
    path: str | Path, decoder_config: MaskDecoderConfig = MASK_DECODER_PRESETS["sam"]
) -> Sam:
    """A whole SAM from an original checkpoint, in eval mode on the CPU, every tensor loaded.

    The encoder is sized from the file; the decoder and prompt encoder follow `decoder_config`
    (SAM's for every release; the decoder's head count leaves no trace in the shapes).
    """
    state = read_sam_state_dict(path)
    encoder_config = infer_sam_encoder_config(_encoder_state(state), path)
    if encoder_config.out_chans != decoder_config.transformer_dim:
        raise ValueError(
            f"{path}: the encoder's neck has {encoder_config.out_chans} output channels "
            f"('{ENCODER_PREFIX}neck.0.weight'), the decoder config transformer_dim="
            f"{decoder_config.transformer_dim}; pass the checkpoint's decoder_config"
        )
    config = SamConfig(encoder=encoder_config, decoder=decoder_config)
    # Built on the meta device: no random init of weights that are about to be replaced; the
    # pixel statistics (not in the file) are made by Sam itself, on the CPU.
    with torch.device("meta"):
        parts = build_sam_parts(config)
    sam = Sam(**parts)
    expected = sam.state_dict()
    check_tensors(path, state, expected, lambda key: _sized_by(key, config))
    # assign=True adopts the loaded tensors (the meta ones have no storage to copy into).
    sam.load_state_dict(
        {key: state[key].to(tensor.dtype) for key, tensor in expected.items()},
        strict=True, assign=True,
    )
    return sam.eval()


def _sized_by(key: str, config: SamConfig) -> str:
    """The part of the configuration that fixes this key's shape, for error messages."""
    if key.startswith(ENCODER_PREFIX):
        return f"the encoder sized from the file, {config.encoder}"
    return f"{config.decoder} (mask_in_chans={config.mask_in_chans})"


def no_mask_prompt_encoder(prompt_encoder: PromptEncoder) -> NoMaskPromptEncoder:
    """The two pieces of SAM's prompt encoder a text-prompted decoder uses (LISA), with SAM's
    weights: the image grid's positional encoding and the no-mask dense embedding."""
    reduced = NoMaskPromptEncoder(prompt_encoder.embed_dim)
    reduced.load_state_dict({key: value for key, value in prompt_encoder.state_dict().items()
                             if key.startswith(("pe_layer.", "no_mask_embed."))})
    return reduced
