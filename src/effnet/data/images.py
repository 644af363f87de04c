"""One image for inference, from whatever a caller holds: a file path, encoded bytes (JPEG, PNG, WebP, ...), base64
text of such bytes (or a `data:` URL), or a decoded HWC uint8 array. Each becomes an RGB PIL image the way the
`shard` stage stores training images (EXIF orientation applied, 16-bit greyscale scaled, not clipped), so a photo
is seen at prediction as it was in training.

Every failure is an `ImageError` whose message is the reason on one line: `effnet predict` puts it in the image's
row, the served model answers it with a 4xx.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=-]+)*;base64,", re.IGNORECASE)


class ImageError(ValueError):
    """Why an item is not a usable image (one line)."""


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit greyscale: scale to 8 bits, not clip
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return img.convert("RGB")


def decode(data: bytes) -> Image.Image:
    """Encoded image bytes -> RGB image, fully decoded (a truncated file fails here, not later)."""
    if not data:
        raise ImageError("empty file")
    try:
        img = Image.open(BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (no known image format)") from None
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError and whatever a plugin raises
        raise ImageError(f"not an image: {_first_line(e)}") from None
    try:
        return to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ImageError(f"corrupt image: {_first_line(e)}") from None


def read(path: str | os.PathLike) -> Image.Image:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"unreadable: {e.strerror or _first_line(e)}") from None
    return decode(data)


def from_text(text: str) -> Image.Image:
    """A `data:` URL, a path of an existing file, or base64 of the image's bytes (whitespace and missing padding
    are forgiven: `base64` wraps its output)."""
    match = DATA_URL.match(text)
    if match is None and os.path.isfile(text):
        return read(text)
    payload = "".join(text[match.end() if match else 0:].split())
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        data = None
    if not data:
        raise ImageError(f"neither a file nor base64 image data: {text[:40]!r}{'...' if len(text) > 40 else ''}")
    return decode(data)


def from_array(array) -> Image.Image:
    """A decoded HWC (or HW greyscale) image of integers 0..255."""
    a = np.asarray(array)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or 0 in a.shape:
        raise ImageError(f"an image array must be HxWx3 (or HxW, HxWx1, HxWx4), got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 255:
            found = f" in [{a.min()}, {a.max()}]" if a.dtype.kind in "iuf" else ""
            raise ImageError(f"an image array must hold integers 0..255, got {a.dtype}{found}")
        a = a.astype(np.uint8)
    return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a).convert("RGB")


def load(item) -> Image.Image:
    """Any of the forms above, by type: str (data URL, path or base64), path, bytes, or array."""
    if isinstance(item, str):
        return from_text(item)
    if isinstance(item, os.PathLike):
        return read(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode(bytes(item))
    if isinstance(item, (np.ndarray, list)):
        return from_array(item)
    raise ImageError(f"not an image: a {type(item).__name__} (expected a path, bytes, base64 text or an array)")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
