"""Image and mask decoding, resizing and encoding, with errors that name the file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadSampleError(ValueError):
    """A sample that cannot go into the dataset; ``path`` names the offending file or category."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # exceptions cross process boundaries in the conversion pool
        return type(self), (self.path, self.reason)


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_LABEL_IDS = 32  # a lossless mask with at most this many values, all below half range, holds class ids


def _open(path: str | Path, what: str) -> Image.Image:
    """Open and fully decode (truncated files fail here, not later), with errors that name the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError as exc:
        raise BadSampleError(path, f"{what} file not found") from exc
    except Image.DecompressionBombError as exc:
        raise BadSampleError(path, f"{what} too large to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadSampleError(path, f"unreadable or truncated {what} ({exc})") from exc


def _eight_bit_gray(im: Image.Image) -> np.ndarray:
    """A single-channel image as uint8: 16-bit values scaled down (a plain conversion clips them to white)."""
    if im.mode in _SIXTEEN_BIT:
        values = np.asarray(im).astype(np.float64)
        return np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return np.asarray(im.convert("L"))


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file fully and convert it to 8-bit RGB (16-bit grayscale scaled, not clipped)."""
    im = _open(path, "image")
    if im.mode in _SIXTEEN_BIT:
        return Image.fromarray(_eight_bit_gray(im), mode="L").convert("RGB")
    return im.convert("RGB")


def load_mask(path: str | Path) -> Image.Image:
    """Open a mask and binarise it at half range (lossy JPEG masks blur their edges), except a lossless
    mask of a few small values, which holds class ids (VisA): any non-zero id is anomalous."""
    values = _eight_bit_gray(_open(path, "mask"))
    distinct = np.unique(values)
    ids = values.max() < 128 and len(distinct) <= _LABEL_IDS
    return Image.fromarray(np.where(values > 0 if ids else values >= 128, 255, 0).astype(np.uint8), mode="L")


def resize_pair(image: Image.Image, mask: Image.Image | None, size: int) -> tuple[Image.Image, Image.Image | None]:
    """Resize to ``size`` x ``size``: bicubic for the image, nearest-neighbour for the mask (stays 0/255)."""
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    if mask is not None:
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    return image, mask


def encode_png(array_or_image: np.ndarray | Image.Image) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded bytes to an H x W x 3 uint8 array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_mask(data: bytes | None, height: int, width: int) -> np.ndarray:
    """Encoded mask (None, or empty bytes as Arrow nulls may arrive, for a normal sample) to H x W uint8 0/1."""
    if not data:
        return np.zeros((height, width), dtype=np.uint8)
    with Image.open(io.BytesIO(data)) as im:
        return (np.asarray(im.convert("L")) > 127).astype(np.uint8)
