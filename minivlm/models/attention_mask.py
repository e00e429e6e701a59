"""Who may attend to whom, and at which RoPE position: every attention mask the LM uses.

    one sample per row, causal images ─► the (B, S) padding mask itself (Transformer's own path:
                                         SDPA's fused causal kernel when nothing is padded)
    packed rows and/or bidirectional images ─► a ready (B, 1, T, T) boolean mask, True = may attend:
        causal, within one sample (document) only, never onto padding; with
        `ImageTokensConfig.attention="bidirectional"`, the tokens of one image also see each other
        (prefix-LM over the image, as PaliGemma does for its whole prefix)
Positions restart at 0 at each packed sample, so a packed sample sees exactly the RoPE angles it
would see alone (the "document masking" of Krell et al. 2021, "Efficient Sequence Packing").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from minivlm.ranges import check_ranges, one_of


@dataclass
class ImageTokensConfig:
    """How the LM treats the rows spliced in for an image."""

    # "causal": LLaVA, an image token sees only the image tokens before it. "bidirectional":
    # every token of one image occurrence (all its tiles) sees every other; text stays causal.
    attention: str = field(default="causal", metadata=one_of("causal", "bidirectional"))
    # "none": image tokens carry only the tower's features (and their 1-D RoPE position);
    # "2d": plus a learned row and column embedding each (image_positions.py)
    positions: str = field(default="none", metadata=one_of("none", "2d"))

    def __post_init__(self):
        check_ranges(self)


def build_attention_mask(attention_mask: torch.Tensor | None, query_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True = may attend: causal, and never onto padding keys.

    Returns None when there is no padding and either nothing is cached (plain causal attention:
    SDPA's fused kernel) or a single new token attends to everything before it.
    """
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and (past_len == 0 or query_len == 1):
        return None
    key_len = past_len + query_len
    query_pos = torch.arange(past_len, key_len, device=device)
    causal = query_pos[:, None] >= torch.arange(key_len, device=device)[None, :]  # (T, S)
    mask = causal[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :key_len].bool()  # (B, 1, T, S)
        # A fully padded query row (left padding) would softmax over nothing -> NaN; let it see
        # itself. Its output is never used.
        mask = mask | (query_pos[:, None] == torch.arange(key_len, device=device)[None, :])
    return mask


def positions_from_mask(attention_mask, past_len: int, query_len: int, device) -> torch.Tensor:
    """Position of each query token: counts only real tokens, so left padding doesn't shift RoPE."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + query_len, device=device)[None]  # (1, T)
    positions = attention_mask.long().cumsum(-1) - 1  # (B, S)
    return positions.clamp(min=0)[:, past_len:past_len + query_len]  # (B, T)


def _starts(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) True where a run of equal ids begins."""
    return ids != F.pad(ids, (1, 0), value=-1)[:, :-1]


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token inside its own sample: 0 at each sample's first token."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    start = torch.where(_starts(document_ids), index, 0).cummax(-1).values  # (B, T)
    return index - start


def image_blocks(is_image: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) id > 0 of the image occurrence each image token belongs to, 0 for text: one id per
    unbroken run of image tokens inside one sample (the tiles of one image are one run; ChatDataset
    refuses two <image> placeholders with nothing between them, whose runs would merge)."""
    run_start = is_image & _starts(is_image.long() + 2 * document_ids)  # a new run or sample
    return run_start.long().cumsum(-1) * is_image  # (B, T)


def document_mask(document_ids: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, T, T) boolean, True = may attend: causal within each document (id > 0, 0 = padding);
    with `blocks` (image_blocks), also every pair of tokens of the same image."""
    T = document_ids.shape[1]
    position = torch.arange(T, device=document_ids.device)
    causal = position[:, None] >= position[None, :]  # (T, T)
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    allowed = causal & same_document & (document_ids > 0)[:, None, :]
    if blocks is not None:
        same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks > 0)[:, :, None]
        allowed = allowed | same_image  # (B, T, T)
    # A padding query would softmax over nothing -> NaN; let it see itself (its output is unused).
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=document_ids.device)
    return allowed[:, None]  # (B, 1, T, T)


def lm_attention(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 image_token_id: int, image_attention: str = "causal",
                 document_ids: torch.Tensor | None = None):
    """(mask, position_ids) to hand `Transformer.hidden_states` for these ids.

    `document_ids` (B, T), from a packed batch (data/packing.py): which sample each token belongs
    to, 0 = padding. Without packing, and with causal image attention (or no image in the batch),
    this is the padding mask itself and no positions: the Transformer's default path, unchanged.
    """
    is_image = input_ids == image_token_id  # (B, T)
    bidirectional = image_attention == "bidirectional" and bool(is_image.any())
    if document_ids is None and not bidirectional:
        return attention_mask, None
    if document_ids is None:  # one sample per row (left or right padded)
        document_ids = (torch.ones_like(input_ids) if attention_mask is None
                        else attention_mask.long())
    blocks = image_blocks(is_image, document_ids) if bidirectional else None
    return document_mask(document_ids, blocks), positions_in_documents(document_ids)
