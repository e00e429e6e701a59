"""Images in: any file opened as 8-bit RGB, then cut, resized and normalised for the tower.

First, 8-bit RGB, the one form the vision tower takes.

Real data arrives in every mode PIL knows: palette PNGs (with or without a transparent
index), RGBA screenshots, grayscale and 16-bit medical slices, CMYK JPEGs. A plain
`convert("RGB")` gets two of them wrong, so they are handled here:
  - transparency (RGBA, LA, PA, P or L with a tRNS entry) is *composited* on a background:
    dropping the alpha channel would show whatever colour the transparent pixels happen
    to store (often black), not what a viewer sees;
  - 16-bit and float images (I;16, I, F) are stretched from their own min..max to 0..255:
    `convert` clips at 255, which turns a 12-bit CT slice (0..4095) almost all white.
EXIF orientation is applied (as cv2.imread and labelme do), so masks drawn on the
displayed image line up with what we load. An image with more than `max_pixels` pixels is
refused from its header, before any decoding (see MAX_IMAGE_PIXELS). An image is a file's path or
the encoded file's bytes (a tar member, a parquet cell: data/shard_stream.py, data/hf_datasets.py).

Then into the tower's input (the second half of this file): resize, InternVL's dynamic tiles,
CLIP normalisation.

    PIL image ─► dynamic_tiles (a grid of tiles + a thumbnail, or the image alone) ─► resize each
    to S x S ─► (pixels / 255 - mean) / std ─► (tiles, 3, S, S)
The tower decides S and the normalisation its weights expect (`ImageProcessor.for_tower`); this
file decides how many tiles an image becomes, which the data pipeline needs before it loads a
single pixel (`num_tiles`, from the image's size alone).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# The default pixel budget of one image: 8192 x 8192. PIL only warns below 2 x 89M pixels and
# decodes in full, so a 12 KB PNG that says 10000 x 10000 took 623 MB. Training images are far
# smaller (COCO/LLaVA under 1M pixels, SA-1B about 3.4M); a 48-megapixel photo still passes.
MAX_IMAGE_PIXELS = 8192 * 8192
ImageSource = str | Path | bytes  # a file, or an encoded file's bytes (PNG, JPEG, ...)


class ImageError(ValueError):
    """An image file that cannot be read; the message is one line: "path: what is wrong"."""


def _path_or_bytes(source: ImageSource) -> Path | bytes:
    return source if isinstance(source, bytes) else Path(source)


def _name(source: Path | bytes) -> str:
    """What an error calls the image: its path, or its size when it is bytes (the caller's message
    names the record the bytes came from)."""
    return f"<{len(source)} bytes of image data>" if isinstance(source, bytes) else str(source)


def _open_checked(path: Path | bytes, max_pixels: int | None = None) -> Image.Image:
    """Image.open (header only) with every failure turned into a one-line ImageError naming the
    file; an image over `max_pixels` pixels is one of them."""
    name = _name(path)
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: `max_pixels` decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, expected an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file PIL can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"{name}: cannot open image ({_one_line(error)})") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageError(f"{name}: {width}x{height} is {width * height:,} pixels, over the "
                         f"max_image_pixels limit of {max_pixels:,} (not decoded)")
    return image


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation load_image applies, from the header. A PNG's eXIf chunk belongs
    before its pixels (PNG, third edition); PIL would decode the whole image to look for one
    after them, so that is not done: a header read stays a header read."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(EXIF_ORIENTATION_TAG, 1)


def image_size(path: ImageSource, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) as `load_image` will return it, read from the header only (no decoding);
    with `max_pixels`, refuses a larger image as `load_image` would."""
    path = _path_or_bytes(path)
    with _open_checked(path, max_pixels) as image:
        width, height = image.size
        try:
            orientation = _orientation(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(f"{_name(path)}: cannot read the image's metadata "
                             f"({_one_line(error)})") from None
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


def load_image(path: ImageSource, background: tuple[int, int, int] = (255, 255, 255),
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `path` to an 8-bit RGB PIL image (any mode, EXIF orientation applied).

    Transparent pixels are composited on `background`. Raises ImageError (a ValueError)
    with one line "path: what is wrong" for a missing, unreadable, truncated or too large file.
    """
    path = _path_or_bytes(path)
    with _open_checked(path, max_pixels) as image:
        try:
            orientation = _orientation(image)  # as image_size sees it
            image.load()  # decode now, so a truncated file fails here with its name
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode in HIGH_DEPTH_MODES:
                return _stretch_to_8bit(image)
            if image.mode in ALPHA_MODES or "transparency" in image.info:
                return _composite(image, background)
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(f"{_name(path)}: cannot decode {image.format or 'image'} "
                             f"in mode {image.mode} ({_one_line(error)})") from None


class ImageProcessor:
    """PIL image -> (tiles, 3, S, S) normalised tensor. One tile unless `max_tiles` > 1."""

    def __init__(self, image_size: int, mean, std, max_tiles: int = 1):
        self.image_size, self.max_tiles = image_size, max_tiles
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]

    @classmethod
    def for_tower(cls, tower) -> "ImageProcessor":
        """Matched to a models.vision.VisionTower (read, not imported: data never imports the
        model): its input size, its weights' normalisation, its tiling."""
        return cls(tower.config.image_size, tower.mean, tower.std, tower.config.max_tiles)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, S, S)
        return torch.from_numpy((array - self.mean) / self.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        tiles = dynamic_tiles(image, self.image_size, self.max_tiles)
        return torch.stack([self.to_tensor(tile) for tile in tiles])  # (n_tiles, 3, S, S)

    def num_tiles(self, size: tuple[int, int]) -> int:
        return num_tiles(*size, self.image_size, self.max_tiles)


def choose_grid(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """InternVL's grid choice: the (cols, rows) with at most `max_tiles` tiles whose aspect ratio
    is closest to the image's; on a tie, the larger grid if the image has the pixels for it."""
    aspect = width / height
    grids = sorted({(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if c * r <= max_tiles}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff or (diff == best_diff and
                                width * height > 0.5 * tile_size ** 2 * cols * rows):
            best, best_diff = (cols, rows), diff
    return best


def num_tiles(width: int, height: int, tile_size: int, max_tiles: int) -> int:
    """Tiles `dynamic_tiles` makes for an image of this size (thumbnail included)."""
    if max_tiles <= 1:
        return 1
    cols, rows = choose_grid(width, height, tile_size, max_tiles)
    return cols * rows + (1 if cols * rows > 1 else 0)


def dynamic_tiles(image: Image.Image, tile_size: int, max_tiles: int) -> list[Image.Image]:
    """InternVL's dynamic preprocessing: resize the image onto the chosen grid, cut it into
    tiles, and append a whole-image thumbnail so the model also sees the global layout."""
    if max_tiles <= 1:
        return [image]
    cols, rows = choose_grid(*image.size, tile_size, max_tiles)
    resized = image.resize((cols * tile_size, rows * tile_size), Image.BICUBIC)
    tiles = [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]  # row-major, as InternVL
    if len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.BICUBIC))
    return tiles
