"""Mask losses as LISA trains its decoder: sigmoid BCE and Dice on mask logits.

LISA (`model/LISA.py: sigmoid_ce_loss, dice_loss`) weights them BCE x 2.0 + Dice x 0.5.
Its losses see only 0/1 targets (its datasets turn ignore pixels into background); ours also
accept targets holding 255 = ignore, and those pixels drop out of both losses. With no ignore
pixels the values equal LISA's.

The two terms take mask logits (N, H, W) and targets (N, H, W) with values 0, 1 or 255, and
return the mean over the N masks (LISA's `loss.sum() / num_masks`), the sum, or per-mask values.
`mask_loss` is the one place they are weighted and averaged for training (any mask sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minivlm.constants import MASK_IGNORE


def split_ignore(gt_masks: Tensor, ignore_index: int = MASK_IGNORE) -> tuple[Tensor, Tensor]:
    """(N, H, W) targets with 0/1/ignore -> float `target` (1 on the object) and `valid`
    (0 on ignore)."""
    valid = (gt_masks != ignore_index).float()
    target = (gt_masks == 1).float()
    return target, valid


def _reduce(per_mask: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_mask.mean()
    if reduction == "sum":  # to sum images with different mask sizes, then divide by all masks
        return per_mask.sum()
    if reduction == "none":
        return per_mask
    raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', found {reduction!r}")


def _check_shapes(mask_logits: Tensor, gt_masks: Tensor, name: str) -> None:
    if mask_logits.dim() != 3 or mask_logits.shape != gt_masks.shape:
        raise ValueError(
            f"{name}: expected logits and targets of the same (N, H, W) shape, found "
            f"{tuple(mask_logits.shape)} and {tuple(gt_masks.shape)}"
        )


def sigmoid_bce_loss(
    mask_logits: Tensor,
    gt_masks: Tensor,
    *,
    ignore_index: int = MASK_IGNORE,
    reduction: str = "mean",
) -> Tensor:
    """Binary cross-entropy per pixel, averaged over each mask's valid pixels, then over masks."""
    _check_shapes(mask_logits, gt_masks, "sigmoid_bce_loss")
    target, valid = split_ignore(gt_masks, ignore_index)
    # float32: under bf16 autocast a sum over a 256x256 mask would lose most of its digits.
    pixel_loss = F.binary_cross_entropy_with_logits(mask_logits.float(), target, reduction="none")
    # A mask with no valid pixel contributes 0 rather than 0/0.
    valid_pixels = valid.flatten(1).sum(1).clamp(min=1.0)  # (N,)
    per_mask = (pixel_loss * valid).flatten(1).sum(1) / valid_pixels  # (N,)
    return _reduce(per_mask, reduction)


def dice_loss(
    mask_logits: Tensor,
    gt_masks: Tensor,
    *,
    scale: float = 1000.0,
    eps: float = 1e-6,
    ignore_index: int = MASK_IGNORE,
    reduction: str = "mean",
) -> Tensor:
    """1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) per mask, with LISA's scale and eps.

    LISA divides every term by `scale` = 1000 before summing, which keeps `eps` from
    mattering on large masks while the ratio itself is unchanged; we keep it to match.
    """
    _check_shapes(mask_logits, gt_masks, "dice_loss")
    target, valid = split_ignore(gt_masks, ignore_index)
    # Ignored pixels predict nothing (their target is 0 too).
    probs = mask_logits.float().sigmoid() * valid
    probs, target = probs.flatten(1), target.flatten(1)  # (N, H*W)
    numerator = 2 * (probs / scale * target).sum(-1)  # (N,)
    denominator = (probs / scale).sum(-1) + (target / scale).sum(-1)  # (N,)
    per_mask = 1 - (numerator + eps) / (denominator + eps)  # (N,)
    return _reduce(per_mask, reduction)


def mask_loss(predicted: list[Tensor], gt_masks: list[Tensor], *, bce_weight: float,
              dice_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """(bce_weight x BCE + dice_weight x Dice, BCE, Dice), each term the mean over masks of the
    per-mask loss. Masks may differ in size (each is at its own image's size), so each is scored
    alone and then averaged: LISA's `sum over masks / num_masks`."""
    bce = torch.stack([sigmoid_bce_loss(p[None], m[None].to(p.device))
                       for p, m in zip(predicted, gt_masks)]).mean()
    dice = torch.stack([dice_loss(p[None], m[None].to(p.device))
                        for p, m in zip(predicted, gt_masks)]).mean()
    return bce_weight * bce + dice_weight * dice, bce, dice
