"""SAM's input frame: resize the longest side to the encoder's size, and map prompts with it.

segment-anything (`utils/transforms.py`, `ResizeLongestSide`) resizes a uint8 HWC image so its
longest side is the encoder's img_size (1024), keeping the aspect ratio; the model then
normalises it with SAM's pixel statistics and pads it bottom/right to a square
(`normalize_and_pad`). Point and box prompts given in original pixels are scaled into the
resized frame. The pixel statistics and the pre/post-processing arithmetic are owned here;
`Sam` registers the statistics as buffers and calls these functions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# ImageNet's RGB mean/std in 0..255 pixels, SAM's normalisation (segment_anything/build_sam.py).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(H, W) after scaling the longest side to `long_side`, rounded half up as SAM does."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: np.ndarray | Tensor, long_side: int) -> Tensor:
    """uint8 (H, W, 3) image -> uint8 (3, h, w) tensor with max(h, w) = long_side.

    PIL's bilinear resize (antialiased when shrinking), which is what SAM's
    `ResizeLongestSide.apply_image` runs through torchvision. torch's own uint8 antialiased
    bilinear differs from it by one grey level on about 1% of pixels, so PIL it is.
    """
    array = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"resize_longest_side: expected a uint8 (H, W, 3) RGB image, got "
            f"{array.dtype} {tuple(array.shape)}"
        )
    height, width = preprocess_shape(array.shape[0], array.shape[1], long_side)
    resized = Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()  # (3, h, w)


def apply_coords(coords: Tensor, original_size: tuple[int, int], long_side: int) -> Tensor:
    """(..., 2) pixel (x, y) in the original (H, W) image -> float32 (x, y) in the resized one."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=torch.float32)  # (2,)
    return coords.to(torch.float32) * scale.to(coords.device)


def apply_boxes(boxes: Tensor, original_size: tuple[int, int], long_side: int) -> Tensor:
    """(B, 4) boxes (x0, y0, x1, y1) in the original image -> the resized frame, (B, 4)."""
    return apply_coords(boxes.reshape(-1, 2, 2), original_size, long_side).reshape(-1, 4)


def normalize_and_pad(
    x: Tensor,
    long_side: int,
    mean: Tensor | tuple[float, ...] = SAM_PIXEL_MEAN,
    std: Tensor | tuple[float, ...] = SAM_PIXEL_STD,
) -> Tensor:
    """Resized (..., 3, h, w) pixels in 0..255 -> (..., 3, S, S), S = long_side: normalised
    with SAM's pixel statistics, padded bottom/right with zeros (the mean colour).
    segment-anything's `Sam.preprocess`."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, long_side - x.shape[-1], 0, long_side - x.shape[-2]))  # (..., 3, S, S)


def sam_preprocess(image: np.ndarray, long_side: int) -> Tensor:
    """uint8 (H, W, 3) RGB image -> float32 (3, S, S), S = long_side: resized (longest side S),
    normalised with SAM's pixel statistics, padded bottom/right with zeros (the mean colour).
    `Sam.preprocess` without a model: what the feature cache and inference give SAM's encoder."""
    return normalize_and_pad(resize_longest_side(image, long_side).float(), long_side)


def postprocess_masks(
    masks: Tensor, long_side: int, original_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> Tensor:
    """Low-res mask logits (B, M, S/4, S/4) in SAM's padded frame -> (B, M, H, W) on the
    original image: upsample to S x S, crop the padding, resize (segment-anything's
    Sam.postprocess_masks). input_size, the resized (h, w), defaults to the one
    `resize_longest_side` gives the original size."""
    if input_size is None:
        input_size = preprocess_shape(*original_size, long_side)
    masks = F.interpolate(masks, (long_side, long_side), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]  # drop the padding
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
