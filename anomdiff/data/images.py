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


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file fully (truncated files fail here, not later) and convert it to RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise BadSampleError(path, "file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadSampleError(path, f"unreadable or truncated image ({exc})") from exc


def load_mask(path: str | Path) -> Image.Image:
    """Open a mask and binarise it: any non-zero pixel is anomalous (VisA stores class ids, not 255)."""
    try:
        with Image.open(path) as im:
            im.load()
            values = np.asarray(im.convert("L"))
    except FileNotFoundError as exc:
        raise BadSampleError(path, "mask file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadSampleError(path, f"unreadable or truncated mask ({exc})") from exc
    return Image.fromarray(np.where(values > 0, 255, 0).astype(np.uint8), mode="L")


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
