"""Safe image decoding: any file PIL can read becomes an RGB image, anything else an `ImageLoadError`.

Real caption datasets hold grayscale, 16-bit, palette, transparent, CMYK, rotated (EXIF) and animated
images, files with the wrong extension, and the odd corrupt or truncated download. A data loader must
turn all of them into RGB or refuse them with one exception type it can catch and count, and it must
refuse a decompression bomb from its header, before allocating its pixels.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 50_000_000  # ~7,000 x 7,000; COCO's largest image is 640 x 640

ImageSource = str | os.PathLike | bytes | BinaryIO

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageLoadError(ValueError):
    """An image that cannot be used; the message names the file and what is wrong with it."""


def _name(source: ImageSource) -> str:
    """How error messages refer to the source."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", "<file object>"))


def _open(source: ImageSource, name: str) -> Image.Image:
    """Image.open on a path, bytes or a binary file object, with empty and missing files named as such."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(f"{name}: file not found")
        if not path.is_file():
            raise ImageLoadError(f"{name}: not a regular file")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{name}: empty file (0 bytes)")
        return Image.open(path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(f"{name}: empty (0 bytes)")
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale to mode L; PIL's own convert clips everything above 255 to white."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited on white (what a viewer shows)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _gray_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the pixels as stored rather than losing them."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure; the pixels themselves decoded fine
        return image


def _decode(source: ImageSource, name: str, max_pixels: int) -> Image.Image:
    with _open(source, name) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageLoadError(
                f"{name}: image too large ({width} x {height} = {width * height:,} pixels, limit {max_pixels:,})"
            )
        image.seek(0)  # first frame of an animated GIF / WebP / APNG
        image.load()
        return _to_rgb(_exif_upright(image))


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode a path, bytes or binary file object into an RGB PIL image, or raise `ImageLoadError`.

    The format is detected from the content, never from the file extension. Images over `max_pixels`
    (or over PIL's own decompression-bomb limit, whichever is lower) are refused from their header.
    """
    name = _name(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(source, name, max_pixels)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{name}: image too large ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image (format not recognised)") from None
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types on bad input; callers need one
        problem = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageLoadError(f"{name}: {problem} image ({type(exc).__name__}: {exc})") from None
