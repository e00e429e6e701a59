"""gIoU / cIoU and the mask losses: hand-computed values and LISA's own formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivlm.eval.seg_iou import SegIoUAccumulator, seg_iou
from minivlm.models.seg_losses import dice_loss, sigmoid_bce_loss


def _hand_masks():
    """Four (pred, gt) pairs of different sizes and types, counted by hand below."""
    # A (3x3): ignore at (1,2) and (2,2). Valid pred fg: (0,0) (0,1) (1,1) -- (1,2) is ignored.
    # gt fg: (0,0) (1,0) (1,1). I = 2, U = 4.
    pred_a = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=np.uint8)
    gt_a = np.array([[1, 0, 0], [1, 1, 255], [0, 0, 255]], dtype=np.uint8)
    # B (2x4): the only predicted pixel is ignored, no target: I = 0, U = 0 -> IoU counts 1.0.
    pred_b = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    gt_b = torch.tensor([[0, 0, 0, 255], [0, 0, 0, 0]], dtype=torch.uint8)
    # C (2x2): missed a one-pixel target: I = 0, U = 1.
    pred_c = torch.zeros(2, 2)
    gt_c = torch.tensor([[0, 1], [0, 0]])
    # D (2x2): I = 3, U = 4.
    pred_d = np.ones((2, 2), dtype=np.int64)
    gt_d = np.array([[1, 1], [1, 0]], dtype=np.uint8)
    return [pred_a, pred_b, pred_c, pred_d], [gt_a, gt_b, gt_c, gt_d]


# gIoU = (2/(4+1e-5) + 1 + 0 + 3/(4+1e-5)) / 4 = (1 + 5/4.00001) / 4
#      = (1 + 1.2499968750078125) / 4 = 0.5624992187519531
HAND_GIOU = 0.5624992187519531
HAND_CIOU = 5 / 9  # (2 + 0 + 0 + 3) / (4 + 0 + 1 + 4)


def test_seg_iou_hand_computed():
    preds, gts = _hand_masks()
    result = seg_iou(preds, gts)
    assert result["giou"] == pytest.approx(HAND_GIOU, abs=1e-12)
    assert result["ciou"] == pytest.approx(HAND_CIOU, abs=1e-12)


def test_empty_targets_and_predictions_count_one():
    empty = np.zeros((3, 3), dtype=np.uint8)
    assert seg_iou([empty, empty], [empty, empty]) == {"giou": 1.0, "ciou": 1.0}
    # One empty pair and one total miss: gIoU = (1 + 0) / 2, cIoU = 0 / 1.
    assert seg_iou([empty, empty], [empty, np.eye(3, dtype=np.uint8)]) == {"giou": 0.5, "ciou": 0.0}


def test_accumulator_streaming_equals_one_shot_and_merges():
    preds, gts = _hand_masks()
    streamed = SegIoUAccumulator()
    streamed.update(preds[0], gts[0])  # one (H, W) mask
    streamed.update(preds[1:3], gts[1:3])  # a list of differently typed masks
    streamed.update(preds[3][None], gts[3][None])  # an (N, H, W) stack
    assert streamed.compute() == seg_iou(preds, gts)
    assert (streamed.intersection_sum, streamed.union_sum, streamed.count) == (5, 9, 4)

    rank0, rank1 = SegIoUAccumulator(), SegIoUAccumulator()
    rank0.update(preds[:1], gts[:1])
    rank1.update(preds[1:], gts[1:])
    merged = SegIoUAccumulator.from_tensor(rank0.to_tensor() + rank1.to_tensor())
    assert merged.state_dict() == streamed.state_dict()
    assert rank0.merge(rank1).compute() == streamed.compute()


def _lisa_intersection_union(output, target, K=2, ignore_index=255):
    """LISA utils/utils.py `intersectionAndUnionGPU`, verbatim apart from the name."""
    output = output.view(-1)
    target = target.view(-1)
    output[target == ignore_index] = ignore_index
    intersection = output[output == target]
    area_intersection = torch.histc(intersection, bins=K, min=0, max=K - 1)
    area_output = torch.histc(output, bins=K, min=0, max=K - 1)
    area_target = torch.histc(target, bins=K, min=0, max=K - 1)
    area_union = area_output + area_target - area_intersection
    return area_intersection, area_union, area_target


def test_seg_iou_matches_lisa_validate_on_random_masks():
    generator = torch.Generator().manual_seed(0)
    preds, gts = [], []
    for height, width in [(5, 7), (8, 8), (3, 11), (6, 4), (9, 5)]:
        preds.append((torch.rand(height, width, generator=generator) > 0.5).int())
        gt = (torch.rand(height, width, generator=generator) > 0.6).int()
        gt[torch.rand(height, width, generator=generator) > 0.8] = 255
        gts.append(gt)
    gts.append(torch.zeros(4, 4, dtype=torch.int))  # an empty target with an empty prediction
    preds.append(torch.zeros(4, 4, dtype=torch.int))
    # LISA train_ds.py `validate`: sums over masks, acc_iou per mask with the empty-union rule.
    intersection, union, acc_iou = 0.0, 0.0, 0.0
    for pred, gt in zip(preds, gts):
        i, u, _ = _lisa_intersection_union(pred.float().clone(), gt.float())
        intersection, union = intersection + i, union + u
        iou = i / (u + 1e-5)
        iou[u == 0] += 1.0
        acc_iou = acc_iou + iou
    lisa = {"giou": float(acc_iou[1]) / len(preds),
            "ciou": float(intersection[1] / (union[1] + 1e-10))}
    ours = seg_iou(preds, gts)
    assert ours["giou"] == pytest.approx(lisa["giou"], abs=1e-6)
    assert ours["ciou"] == pytest.approx(lisa["ciou"], abs=1e-6)


def test_seg_iou_rejects_bad_masks():
    with pytest.raises(ValueError,
                       match=r"mask 0: prediction shape \(2, 3\) != target shape \(3, 2\)"):
        seg_iou([np.zeros((2, 3))], [np.zeros((3, 2))])
    with pytest.raises(ValueError, match="binary mask"):
        seg_iou([torch.full((2, 2), 0.7)], [torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="values 0, 1 or 255"):
        seg_iou([torch.zeros(2, 2)], [torch.full((2, 2), 2)])
    with pytest.raises(ValueError, match="no masks"):
        SegIoUAccumulator().compute()


# Losses: logits [[0, 0], [ln 3, 100]] against targets [[1, 0], [1, ignore]].
LOGITS = torch.tensor([[[0.0, 0.0], [math.log(3.0), 100.0]]])
TARGETS = torch.tensor([[[1, 0], [1, 255]]], dtype=torch.uint8)


def test_bce_ignores_pixels_hand_computed():
    # Valid pixels: ln 2 (p=.5, t=1), ln 2 (p=.5, t=0), -ln(3/4) (p=.75, t=1); mean over 3:
    # (2 ln 2 + ln 4 - ln 3) / 3 = (4 ln 2 - ln 3) / 3 = 0.5579921445...; logit 100 on the
    # ignore pixel would add ~100 if it counted as background.
    expected = (4 * math.log(2) - math.log(3)) / 3
    assert sigmoid_bce_loss(LOGITS, TARGETS).item() == pytest.approx(expected, abs=1e-6)


def test_dice_ignores_pixels_hand_computed():
    # p = [.5, .5, .75, (ignored) 0], t = [1, 0, 1, 0]: sum(p t) = 1.25, sum p = 1.75, sum t = 2.
    # 1 - (2 * 1.25 / 1000 + 1e-6) / ((1.75 + 2) / 1000 + 1e-6) = 1 - 0.002501 / 0.003751
    expected = 1 - 0.002501 / 0.003751  # = 0.33324446814... (1/3 without eps)
    assert dice_loss(LOGITS, TARGETS).item() == pytest.approx(expected, abs=1e-6)
    # A second, fully ignored mask adds 0 to both losses: the mean halves.
    logits = torch.cat([LOGITS, torch.full((1, 2, 2), 5.0)])
    targets = torch.cat([TARGETS, torch.full((1, 2, 2), 255, dtype=torch.uint8)])
    assert dice_loss(logits, targets, reduction="none")[1].item() == 0.0
    assert sigmoid_bce_loss(logits, targets).item() == pytest.approx(
        (4 * math.log(2) - math.log(3)) / 6, abs=1e-6
    )


def _lisa_dice_loss(inputs, targets, num_masks, scale=1000, eps=1e-6):
    """LISA model/LISA.py `dice_loss`, verbatim."""
    inputs = inputs.sigmoid()
    inputs = inputs.flatten(1, 2)
    targets = targets.flatten(1, 2)
    numerator = 2 * (inputs / scale * targets).sum(-1)
    denominator = (inputs / scale).sum(-1) + (targets / scale).sum(-1)
    loss = 1 - (numerator + eps) / (denominator + eps)
    loss = loss.sum() / (num_masks + 1e-8)
    return loss


def _lisa_sigmoid_ce_loss(inputs, targets, num_masks):
    """LISA model/LISA.py `sigmoid_ce_loss`, verbatim."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    loss = loss.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)
    return loss


def test_losses_equal_lisa_without_ignore_pixels():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 5, 6, generator=generator)
    targets = (torch.rand(3, 5, 6, generator=generator) > 0.5).float()
    assert sigmoid_bce_loss(logits, targets).item() == pytest.approx(
        _lisa_sigmoid_ce_loss(logits, targets, 3).item(), abs=1e-6
    )
    assert dice_loss(logits, targets).item() == pytest.approx(
        _lisa_dice_loss(logits, targets, 3).item(), abs=1e-6
    )
    assert dice_loss(logits, targets, reduction="sum").item() == pytest.approx(
        3 * _lisa_dice_loss(logits, targets, 3).item(), abs=1e-5
    )
