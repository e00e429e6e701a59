"""Who may attend to whom, and at which RoPE position: every attention mask the LM uses.

    one sample per row, causal images ─► the (B, S) padding mask itself (Transformer's own path:
                                         SDPA's fused causal kernel when nothing is padded)
    packed rows and/or bidirectional images ─► a ready (B, 1, T, T) boolean mask, True = may attend:
        causal, within one sample (document) only, never onto padding; with
        `ImageTokensConfig.attention="bidirectional"`, the tokens of one image also see each other
        (prefix-LM over the image, as PaliGemma does for its whole prefix)
    ... packed rows on CUDA, in training ─► the same rule as FlexAttention's BlockMask, whose
        kernel skips every 128×128 block that is wholly masked (the cross-sample blocks of a
        packed row), where SDPA's dense mask computes them and throws them away
    ... packed rows elsewhere ─► DocumentSpans: the rule is block-diagonal (no pair crosses a
        sample), so each sample is one small SDPA call under its own (1, 1, L, L) block of the
        same mask, and the cross-sample blocks are never computed (FlexAttention's backward has
        no CPU kernel)
Positions restart at 0 at each packed sample, so a packed sample sees exactly the RoPE angles it
would see alone (the "document masking" of Krell et al. 2021, "Efficient Sequence Packing").
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

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


def document_block_mask(document_ids: torch.Tensor,
                        blocks: torch.Tensor | None = None) -> BlockMask:
    """`document_mask`'s rule as FlexAttention's BlockMask: the same pairs may attend."""
    B, T = document_ids.shape

    def may_attend(b, h, q, k):  # scalar indices; FlexAttention vmaps it over (B, H, T, T)
        allowed = ((q >= k) & (document_ids[b, q] == document_ids[b, k])
                   & (document_ids[b, k] > 0))
        if blocks is not None:
            allowed = allowed | ((blocks[b, q] == blocks[b, k]) & (blocks[b, q] > 0))
        return allowed | (q == k)
    return create_block_mask(may_attend, B, None, T, T, device=document_ids.device)


@dataclass
class DocumentSpans:
    """Packed rows cut where no attention crosses: row b is `lengths[b]` spans end to end, each
    one sample (or the row's padding tail). `masks[b][i]` is `document_mask`'s rule over span i
    alone, the diagonal block of the (B, 1, T, T) mask (every other block is False), or None
    where that block is plain causal: SDPA's fused causal kernel, which skips the upper half.
    For a training forward: the spans cut the queries and the keys alike (no KV cache)."""

    lengths: list[list[int]]
    masks: list[list[torch.Tensor | None]]  # (1, 1, L, L) each


def document_spans(document_ids: torch.Tensor,
                   blocks: torch.Tensor | None = None) -> DocumentSpans:
    """`document_mask`'s rule as DocumentSpans: one span per run of equal document ids."""
    T = document_ids.shape[1]
    lengths, masks = [], []
    for b, starts in enumerate(_starts(document_ids).tolist()):
        edges = [t for t, is_start in enumerate(starts) if is_start] + [T]
        lengths.append([end - start for start, end in zip(edges[:-1], edges[1:])])
        masks.append([])
        for start, end in zip(edges[:-1], edges[1:]):
            ids = document_ids[b:b + 1, start:end]  # (1, L)
            images = None if blocks is None else blocks[b:b + 1, start:end]
            plain_causal = bool(ids[0, 0] > 0) and (images is None or not bool(images.any()))
            masks[b].append(None if plain_causal else document_mask(ids, images))
    return DocumentSpans(lengths, masks)


def attend_spans(q, k, v, spans: DocumentSpans, enable_gqa: bool) -> torch.Tensor:
    """(B, nh, T, hd): SDPA over each span alone, the outputs laid back end to end. Equal to SDPA
    under the whole (B, 1, T, T) mask, whose softmax gives the other blocks zero weight. `split`
    (not one slice per span) so that the backward joins each row's gradients in a single copy."""
    rows = []
    for b, row in enumerate(zip(q.split(1), k.split(1), v.split(1))):  # (1, nh or nkv, T, hd)
        q_spans, k_spans, v_spans = (x.split(spans.lengths[b], dim=2) for x in row)  # (1, _, L, hd)
        outs = [F.scaled_dot_product_attention(q_span, k_span, v_span, attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=enable_gqa)
                for q_span, k_span, v_span, mask in zip(q_spans, k_spans, v_spans,
                                                        spans.masks[b])]  # (1, nh, L, hd) each
        rows.append(torch.cat(outs, dim=2))  # (1, nh, T, hd)
    return torch.cat(rows)  # (B, nh, T, hd)


def use_flex_attention(device: torch.device) -> bool:
    """FlexAttention for a packed training forward on CUDA. Its backward has no CPU kernel (torch
    2.14: forward only), so CPUs attend one sample at a time (DocumentSpans)."""
    return device.type == "cuda"


def is_ready_mask(mask) -> bool:
    """A mask built here ((B, 1, T, S) boolean, a BlockMask or DocumentSpans), not a (B, S)
    padding mask."""
    return isinstance(mask, (BlockMask, DocumentSpans)) or (mask is not None and mask.dim() == 4)


@functools.cache
def _compiled_flex_attention():
    # Eager flex_attention is a slow reference; compiled, it is one fused block-sparse kernel.
    return torch.compile(flex_attention)


def attend(q, k, v, mask, enable_gqa: bool) -> torch.Tensor:
    """(B, nh, T, hd) attention of q over k, v under `mask`: a BlockMask goes to FlexAttention,
    DocumentSpans to one SDPA call per span, anything else to SDPA. No mask and several queries
    means plain causal attention from position 0: SDPA's fused causal kernel (a mask is built in
    every other case)."""
    if isinstance(mask, DocumentSpans):
        return attend_spans(q, k, v, mask, enable_gqa)
    if isinstance(mask, BlockMask):
        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa,
                                          is_causal=mask is None and q.shape[2] > 1)


def lm_attention(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 image_token_id: int, image_attention: str = "causal",
                 document_ids: torch.Tensor | None = None, flex: bool = False):
    """(mask, position_ids) to hand `Transformer.hidden_states` for these ids.

    `document_ids` (B, T), from a packed batch (data/packing.py): which sample each token belongs
    to, 0 = padding. Without packing, and with causal image attention (or no image in the batch),
    this is the padding mask itself and no positions: the Transformer's default path, unchanged.
    Otherwise packed rows get DocumentSpans, one sample per row with bidirectional images the
    dense mask (which a KV-cache prefill also takes), and `flex` makes either a BlockMask
    (`use_flex_attention`).
    """
    is_image = input_ids == image_token_id  # (B, T)
    bidirectional = image_attention == "bidirectional" and bool(is_image.any())
    if document_ids is None and not bidirectional:
        return attention_mask, None
    packed = document_ids is not None
    if not packed:  # one sample per row (left or right padded)
        document_ids = (torch.ones_like(input_ids) if attention_mask is None
                        else attention_mask.long())
    blocks = image_blocks(is_image, document_ids) if bidirectional else None
    build = document_block_mask if flex else document_spans if packed else document_mask
    return build(document_ids, blocks), positions_in_documents(document_ids)
