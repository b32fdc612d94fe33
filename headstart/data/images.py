"""Decoding user images the same way everywhere: validation, training, evaluation and prediction.

Pillow applies the EXIF orientation and turns grayscale, palette, RGBA, CMYK and 16-bit images into
8-bit RGB, which is what every backbone and the exported model expect.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Names the decoding (toward the model size: JPEG draft, then an integer box reduce); caches of decoded
# pixels and of features include it, so change it whenever `load_rgb` changes what it returns.
DECODE_ID = "draft-reduce-v1"

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class ImageError(ValueError):
    """An image that cannot be used; the message says why in a few words."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str


def is_candidate_image(path: Path) -> bool:
    """Skip hidden files (.DS_Store, ._resource forks) and files that are not images by name."""
    return is_image_name(path.name)


def is_image_name(name: str) -> bool:
    """`is_candidate_image` on a bare file name (no Path built: the fingerprint asks it of every file)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clipping
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / peak)).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _open(source: str | Path | bytes, max_pixels: int, target_size: int | None = None) -> Image.Image:
    empty = not source if isinstance(source, bytes) else Path(source).stat().st_size == 0
    if empty:
        raise ImageError("empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels
    # opened here so that a file Pillow fails on is closed too; load() reads everything before it closes
    handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    try:
        with handle, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(handle)
            if image.width * image.height > max_pixels:
                raise ImageError(f"too large: {image.width}x{image.height} pixels exceeds max_image_pixels={max_pixels}")
            if target_size:
                # JPEG only (a no-op elsewhere): DCT-domain scaling by 1/2, 1/4 or 1/8, never below the target
                image.draft(None, (target_size, target_size))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"too large (decompression bomb): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can decode") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"corrupt or truncated: {exc}") from None
    return image


def load_rgb(source: str | Path | bytes, max_pixels: int = 40_000_000,
             target_size: int | None = None) -> np.ndarray:
    """Decode an image file or bytes into an HxWx3 uint8 RGB array, upright.

    `target_size` is the model's input side: an image at least twice as large on both sides is
    reduced while decoding (JPEG draft, then an integer box reduction) to no less than that on
    either side, so memory follows the model's size rather than the photo's and the model's own
    Resizing layer still makes the final resize. Training, evaluation and prediction all pass it,
    so they see the same pixels.
    """
    image = _to_rgb(_open(source, max_pixels, target_size))
    factor = min(image.width, image.height) // target_size if target_size else 1
    if factor >= 2:
        image = image.reduce(factor)
    return np.asarray(image, dtype=np.uint8)


def inspect_image(source: str | Path | bytes, max_pixels: int = 40_000_000) -> ImageInfo:
    """Fully decode the image (catching truncation) and report its upright size and original mode."""
    image = _open(source, max_pixels)
    mode = image.mode
    upright = _to_rgb(image)
    return ImageInfo(width=upright.width, height=upright.height, mode=mode)
