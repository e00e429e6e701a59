"""Segmentation metrics as LISA reports them: gIoU and cIoU.

LISA (Lai et al. 2024, `train_ds.py: validate` with `utils.intersectionAndUnionGPU`):
  - per mask, pixels where the ground truth is 255 ("ignore") are removed from both the
    prediction and the target, then foreground intersection I and union U are counted;
  - gIoU = mean over masks of I / (U + 1e-5), where a mask with U = 0 (nothing predicted,
    nothing to find) counts 1.0;
  - cIoU = sum(I) / sum(U) over the whole set (LISA divides by sum(U) + 1e-10; we define an
    empty total union as 1.0, in line with the per-mask rule, where LISA would report 0).
The accumulator keeps the four raw sums so ranks can add them with one all_reduce.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from minivlm.constants import MASK_IGNORE
from minivlm.data.masks import MaskSource

PER_MASK_EPS = 1e-5  # LISA's `intersection_i / (union_i + 1e-5)`

MaskLike = Tensor | np.ndarray | MaskSource


def _as_tensor(mask: MaskLike, what: str) -> Tensor:
    if isinstance(mask, MaskSource):  # a reader's mask, not decoded yet (data/masks.py)
        mask = mask.decode()
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, Tensor):
        raise ValueError(f"{what}: expected a torch tensor or numpy array, "
                         f"found {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{what}: expected an (H, W) mask, found shape {tuple(mask.shape)}")
    return mask


def mask_intersection_union(pred: MaskLike, gt: MaskLike, what: str = "mask") -> tuple[int, int]:
    """Foreground pixel counts (intersection, union) of one (H, W) prediction against its gt.

    pred holds 0/1 (or bool; threshold logits first: `logits > 0`); gt holds 0, 1 or 255.
    """
    pred, gt = _as_tensor(pred, f"{what} prediction"), _as_tensor(gt, f"{what} target")
    if pred.shape != gt.shape:
        raise ValueError(
            f"{what}: prediction shape {tuple(pred.shape)} != target shape {tuple(gt.shape)}"
        )
    if pred.dtype != torch.bool and not ((pred == 0) | (pred == 1)).all():
        raise ValueError(f"{what} prediction: expected a binary mask of 0/1 "
                         "(threshold logits at 0)")
    gt = gt.to(pred.device)
    if not ((gt == 0) | (gt == 1) | (gt == MASK_IGNORE)).all():
        raise ValueError(f"{what} target: expected values 0, 1 or {MASK_IGNORE} (ignore)")
    valid = gt != MASK_IGNORE
    pred_fg = (pred != 0) & valid  # LISA sets output[target == 255] = 255: not foreground
    gt_fg = gt == 1
    intersection = int((pred_fg & gt_fg).sum())
    union = int((pred_fg | gt_fg).sum())
    return intersection, union


def _as_mask_list(masks: MaskLike | list | tuple, what: str) -> list[MaskLike]:
    """One (H, W) mask, a (N, H, W) stack or a list of (H, W) masks -> list of (H, W)."""
    if isinstance(masks, (list, tuple)):
        return list(masks)
    if isinstance(masks, (Tensor, np.ndarray)) and masks.ndim == 3:
        return list(masks)
    if isinstance(masks, (Tensor, np.ndarray)) and masks.ndim == 2:
        return [masks]
    shape = tuple(masks.shape) if hasattr(masks, "shape") else type(masks).__name__
    raise ValueError(f"{what}: expected (H, W), (N, H, W) or a list of masks, found {shape}")


@dataclass
class SegIoUAccumulator:
    """Streaming gIoU/cIoU: `update` per mask or per batch, `compute` at the end.

    Validation runs on rank 0 alone; to split it over ranks, all_reduce (SUM) each rank's
    `to_tensor()` and `compute` on `from_tensor` of the result.
    """

    intersection_sum: float = 0.0  # sum of I over masks (pixels)
    union_sum: float = 0.0  # sum of U over masks (pixels)
    iou_sum: float = 0.0  # sum of per-mask IoUs (empty union = 1.0)
    count: float = 0.0  # number of masks

    def update(self, pred: MaskLike | list, gt: MaskLike | list) -> None:
        preds, gts = _as_mask_list(pred, "prediction"), _as_mask_list(gt, "target")
        if len(preds) != len(gts):
            raise ValueError(f"SegIoUAccumulator.update: {len(preds)} predictions "
                             f"for {len(gts)} targets")
        for i, (pred_i, gt_i) in enumerate(zip(preds, gts)):
            intersection, union = mask_intersection_union(pred_i, gt_i, what=f"mask {i}")
            self.intersection_sum += intersection
            self.union_sum += union
            self.iou_sum += intersection / (union + PER_MASK_EPS) if union > 0 else 1.0
            self.count += 1

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("SegIoUAccumulator.compute: no masks were added")
        ciou = self.intersection_sum / self.union_sum if self.union_sum > 0 else 1.0
        return {"giou": self.iou_sum / self.count, "ciou": ciou}

    def merge(self, other: SegIoUAccumulator) -> SegIoUAccumulator:
        """Add another accumulator's sums into this one (e.g. per-dataset or per-rank parts)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def state_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """The four sums as one float64 tensor, ready for `dist.all_reduce` (SUM)."""
        # float64 counts pixels exactly up to 2**53, far beyond any eval set.
        return torch.tensor(list(self.state_dict().values()), dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, sums: Tensor) -> SegIoUAccumulator:
        return cls(*sums.tolist())


def seg_iou(pred_masks: MaskLike | list, gt_masks: MaskLike | list) -> dict[str, float]:
    """{"giou", "ciou"} of binary (H, W) predictions against (H, W) targets, as LISA."""
    accumulator = SegIoUAccumulator()
    accumulator.update(pred_masks, gt_masks)
    return accumulator.compute()
