"""Reading photos as RGB, whatever mode they were saved in, with errors that name the file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


_WORKER_NOTE = "foodvision unreadable image: "


class BadImageError(RuntimeError):
    """A file that cannot be decoded as an image (corrupt, truncated, or not an image at all).

    Raised in a DataLoader worker, it reaches the main process as ``BadImageError(<the worker's traceback
    text>)`` (that is how torch re-raises); the note added here lets that text be turned back into the same
    one-line message, so the tools still print ``error: cannot read image ...`` and no traceback.
    """

    def __init__(self, path: str | Path, reason: str | None = None):
        if reason is None:
            path, reason = _from_worker_text(str(path))
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}. Remove or replace the file, "
            "or set data.skip_bad_images=true to skip such files (they are listed in the run dir)."
        )
        self.add_note(_WORKER_NOTE + json.dumps([self.path, reason]))

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path, self.reason)


def _from_worker_text(text: str) -> tuple[str, str]:
    """(path, reason) from a worker's traceback text (see :class:`BadImageError`)."""
    for line in reversed(text.splitlines()):
        if line.startswith(_WORKER_NOTE):
            try:
                path, reason = json.loads(line[len(_WORKER_NOTE) :])
                return str(path), str(reason)
            except ValueError:
                break
    lines = [line for line in text.splitlines() if line.strip()]
    return "(unknown file)", lines[-1] if lines else text


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    Transparent pixels are composited on white (what a viewer shows), 16-bit and float
    images are rescaled to 0-255 instead of being clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(((array - low) * scale).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` fully into an RGB image (EXIF rotation applied).

    ``draft_size`` lets decoding skip resolution it does not need: JPEGs are decoded scaled by 1/2, 1/4 or
    1/8 (draft mode), and any image still at least twice that size on both sides (a PNG, a JPEG larger
    than 8x) is reduced by an integer factor (``Image.reduce``, a box filter) before its EXIF rotation and
    colour conversion; both keep both sides at least as large as requested, so the resize that follows
    gives nearly what it gives on the full image, at a fraction of the cost (a 6016x4000 JPEG: 470 ms in
    full, 107 ms in draft mode). An image with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a
    decompression bomb, or a scan far larger than any photo) is a bad file, unless it is a JPEG that draft
    mode decodes within the limit.
    """
    try:
        with warnings.catch_warnings():
            # Over MAX_IMAGE_PIXELS PIL only warns (it raises over twice that): decided below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if draft_size is not None and image.format == "JPEG":
                    image.draft("RGB", draft_size)
                _check_pixels(image)
                image.load()
                image = reduce_to(image, draft_size)
                image = ImageOps.exif_transpose(image)
                return reduce_to(to_rgb(image), draft_size)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"too large: {error}") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error


# Modes Image.reduce averages correctly (a palette image's indices must not be averaged: it is reduced
# after its conversion to RGB).
REDUCIBLE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "I", "F", "CMYK")


def reduce_to(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """``image`` shrunk by the largest integer factor that keeps both sides at least ``size`` (unchanged
    when that factor is 1, without ``size``, or for a mode that cannot be averaged). EXIF data is kept."""
    if size is None or image.mode not in REDUCIBLE_MODES:
        return image
    factor = min(image.width // max(1, size[0]), image.height // max(1, size[1]))
    if factor < 2:
        return image
    reduced = image.reduce(factor)
    reduced.info = dict(image.info)  # the EXIF orientation, read by exif_transpose
    return reduced


def _check_pixels(image: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} = {width * height} pixels, over the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS; could be a decompression bomb)"
        )
