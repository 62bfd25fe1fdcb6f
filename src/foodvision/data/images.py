"""Reading photos as RGB, whatever mode they were saved in, with errors that name the file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class BadImageError(RuntimeError):
    """A file that cannot be decoded as an image (corrupt, truncated, or not an image at all)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}. Remove or replace the file, "
            "or set data.skip_bad_images=true to skip such files (they are listed in the run dir)."
        )


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

    ``draft_size`` lets JPEG decoding skip resolution it does not need: the decoder scales by
    1/2, 1/4 or 1/8 while keeping both sides at least as large as requested. An image with more pixels
    than ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb, or a scan far larger than any photo) is a
    bad file, unless it is a JPEG that draft mode decodes within the limit.
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
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"too large: {error}") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error


def _check_pixels(image: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} = {width * height} pixels, over the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS; could be a decompression bomb)"
        )
