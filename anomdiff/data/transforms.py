"""Batch decoding for training and evaluation: encoded rows to normalised tensors-to-be (NumPy).

Used inside Ray Data's ``map_batches`` by the pipelines and directly by single-process code.
Images come out as float32 N x 3 x S x S in [-1, 1] (the range the VAE expects), or as uint8 pixels
for training streams, which carry a quarter of the bytes through Ray's object store and shuffle
buffer and are brought to [-1, 1] by ``unit_range`` on the training device; masks come out as
float32 N x 1 x S x S in {0, 1}, and the category name as an index into a fixed category list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from anomdiff.data.images import decode_mask, decode_rgb
from anomdiff.data.splits import is_validation

COLUMNS = ("sample_id", "category", "label", "image", "mask", "height", "width")


def unit_range(pixels):
    """uint8 pixels (NumPy or torch) as floats in [-1, 1]."""
    return pixels / 127.5 - 1.0


class DecodeBatch:
    """Callable for ``map_batches`` (``batch_format="pyarrow"``): decode, resize to ``image_size``,
    normalise, index categories. ``training``: only what a training step reads, the pixels as
    decoded (uint8, normalised on the device) and the category index; no mask is decoded, since
    training images are normal."""

    def __init__(self, image_size: int, categories: Sequence[str], training: bool = False):
        self.image_size = image_size
        self.uint8 = training
        self.categories = list(categories)
        self.index = {name: i for i, name in enumerate(self.categories)}

    def _resize(self, array: np.ndarray, nearest: bool) -> np.ndarray:
        if array.shape[0] == self.image_size and array.shape[1] == self.image_size:
            return array
        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
        return np.asarray(Image.fromarray(array).resize((self.image_size, self.image_size), resample))

    def __call__(self, rows: pa.Table) -> dict[str, np.ndarray]:
        images_bytes, masks_bytes = rows.column("image").to_pylist(), rows.column("mask").to_pylist()
        heights, widths = rows.column("height").to_pylist(), rows.column("width").to_pylist()
        n = rows.num_rows
        images = np.empty((n, 3, self.image_size, self.image_size), np.uint8 if self.uint8 else np.float32)
        masks = None if self.uint8 else np.empty((n, 1, self.image_size, self.image_size), np.float32)
        for i in range(n):
            rgb = self._resize(decode_rgb(images_bytes[i]), nearest=False)
            images[i] = rgb.transpose(2, 0, 1) if self.uint8 else unit_range(rgb.transpose(2, 0, 1))
            if masks is not None:
                masks[i, 0] = self._resize(decode_mask(masks_bytes[i], heights[i], widths[i]), nearest=True)
        try:
            category_index = np.array([self.index[c] for c in rows.column("category").to_pylist()], np.int64)
        except KeyError as exc:
            raise KeyError(f"category {exc.args[0]!r} is not among the model's {len(self.categories)} categories")\
                from None
        if masks is None:
            return {"image": images, "category_index": category_index}
        return {
            "image": images,
            "mask": masks,
            "label": rows.column("label").to_numpy().astype(np.int64),
            "category_index": category_index,
            "sample_id": np.asarray(rows.column("sample_id").to_pylist(), dtype=object),
        }


class SelectHoldout:
    """Callable for ``map_batches`` on raw Arrow rows: keep the validation hold-out, or everything but it."""

    def __init__(self, fraction: float, seed: int, validation: bool):
        self.fraction, self.seed, self.validation = fraction, seed, validation

    def __call__(self, rows: pa.Table) -> pa.Table:
        held = np.array([is_validation(s, self.fraction, self.seed) for s in rows.column("sample_id").to_pylist()],
                        dtype=bool)
        return rows.filter(pa.array(held if self.validation else ~held))


class SelectIds:
    """Callable for ``map_batches`` on raw Arrow rows: keep the rows whose ``sample_id`` is in ``ids``."""

    def __init__(self, ids: frozenset[str]):
        self.ids = ids

    def __call__(self, rows: pa.Table) -> pa.Table:
        return rows.filter(pa.array([s in self.ids for s in rows.column("sample_id").to_pylist()], type=pa.bool_()))


class RepeatByCategory:
    """Callable for ``map_batches`` on decoded batches: repeat each row ``factors[category]`` times
    (category-balanced sampling; factors are the largest category's count over each one's)."""

    def __init__(self, factors: dict[str, int], categories: Sequence[str]):
        self.repeats = np.array([max(1, int(factors[c])) for c in categories], dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = np.repeat(np.arange(len(batch["category_index"])), self.repeats[batch["category_index"]])
        return {name: column[index] for name, column in batch.items()}
