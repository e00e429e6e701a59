"""Open any image file as 8-bit RGB, the one form the vision tower takes.

Real data arrives in every mode PIL knows: palette PNGs (with or without a transparent
index), RGBA screenshots, grayscale and 16-bit medical slices, CMYK JPEGs. A plain
`convert("RGB")` gets two of them wrong, so they are handled here:
  - transparency (RGBA, LA, PA, P or L with a tRNS entry) is *composited* on a background:
    dropping the alpha channel would show whatever colour the transparent pixels happen
    to store (often black), not what a viewer sees;
  - 16-bit and float images (I;16, I, F) are stretched from their own min..max to 0..255:
    `convert` clips at 255, which turns a 12-bit CT slice (0..4095) almost all white.
EXIF orientation is applied (as cv2.imread and labelme do), so masks drawn on the
displayed image line up with what we load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageError(ValueError):
    """An image file that cannot be read; the message is one line: "path: what is wrong"."""


def _open_checked(path: Path) -> Image.Image:
    """Image.open with every failure turned into a one-line ImageError naming the file."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, expected an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"{path}: cannot open image ({_one_line(error)})") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as `load_image` will return it, read from the header only (no decoding)."""
    path = Path(path)
    with _open_checked(path) as image:
        width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    if orientation in TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-blend over a solid background: out = (c * a + bg * (255 - a)) / 255, rounded."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)  # (H, W, 4)
    alpha = rgba[..., 3:4]  # (H, W, 1)
    colour = rgba[..., :3]  # (H, W, 3)
    bg = np.asarray(background, dtype=np.uint32)  # (3,)
    blended = (colour * alpha + bg * (255 - alpha) + 127) // 255  # +127: round, not floor
    return Image.fromarray(blended.astype(np.uint8), "RGB")


def _stretch_to_8bit(image: Image.Image) -> Image.Image:
    """Map a 16-bit / int32 / float image's actual min..max linearly onto 0..255.

    A constant image has no range to stretch and becomes black.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))  # (H, W)
    low, high = values.min(), values.max()
    if high > low:
        values = (values - low) * (255.0 / (high - low))
    else:
        values = np.zeros_like(values)
    gray = Image.fromarray(np.rint(values).astype(np.uint8), "L")
    return gray.convert("RGB")


def load_image(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode `path` to an 8-bit RGB PIL image (any mode, EXIF orientation applied).

    Transparent pixels are composited on `background`. Raises ImageError (a ValueError)
    with one line "path: what is wrong" for a missing, unreadable or truncated file.
    """
    path = Path(path)
    with _open_checked(path) as image:
        try:
            image.load()  # decode now, so a truncated file fails here with its name
            image = ImageOps.exif_transpose(image)
            if image.mode in HIGH_DEPTH_MODES:
                return _stretch_to_8bit(image)
            if image.mode in ALPHA_MODES or "transparency" in image.info:
                return _composite(image, background)
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(f"{path}: cannot decode {image.format or 'image'} "
                             f"in mode {image.mode} ({_one_line(error)})") from None
