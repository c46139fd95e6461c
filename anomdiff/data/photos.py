"""An anomaly-detection benchmark cut from real photographs, written in the MVTec AD folder layout.

The procedural data of :mod:`anomdiff.data.synthetic` is what training validates on, so a model can
learn its quirks. This module gives an independent check on real image statistics: each category
is one region of one photograph bundled inside the scikit-image wheel (``skimage/data``), and its
normal images are crops of that region as a camera over a production line would see them: small
shifts, a slightly different scale, brightness/contrast/white-balance jitter and sensor noise.
Anomalous test images are such crops with one defect drawn here (``patch`` from another allowed
photograph, ``scratch``, ``discolour``, ``smudge``, ``hole``; none reuses ``paste_anomaly_*``).
Defects are drawn at the output resolution, and a pixel whose change is too faint to see is put
back, so the mask is exactly the set of pixels that differ from the clean crop. Grayscale
photographs are written as RGB with R = G = B, and their defects stay gray too.

``RESERVED`` images (brick, grass, gravel, immunohistochemistry, moon, cell) are kept for a
separate check: they are never loaded, not even as patch donors. Photographs are read straight
from the installed package folder, so nothing is downloaded, and nothing is written there: the
benchmark goes to a temporary folder beside ``out`` and is renamed into place when complete.
Every image is a pure function of ``(seed, category, split, index, image_size)``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from anomdiff.atomic import replace_directory, staging_directory, write_json_atomic
from anomdiff.data.schema import NORMAL_DEFECT
from anomdiff.data.writer import OutputExistsError

RESERVED = ("brick", "grass", "gravel", "immunohistochemistry", "moon", "cell")
# The files behind the reserved names, so a guard on a file name catches them as well.
_RESERVED_FILES = ("brick.png", "grass.png", "gravel.png", "ihc.png", "moon.png", "cell.png")

MARKER = "_photo_benchmark.json"
GENERATOR = "anomdiff.data.photos"
DEFECT_KINDS = ("patch", "scratch", "discolour", "smudge", "hole")
MIN_SIZE, MAX_SIZE = 32, 256
MIN_DELTA = 8  # grey levels: a defect pixel differs from the clean crop by at least this much in some channel
MIN_DEFECT_PIXELS = 4
MAX_AREA_FRACTION = 0.10


@dataclass(frozen=True)
class Photo:
    """One bundled photograph and the square region ``(x, y, side)`` (source pixels) a category crops."""

    file: str
    region: tuple[int, int, int]
    gray: bool


PHOTOS: dict[str, Photo] = {
    "astronaut": Photo("astronaut.png", (80, 280, 200), False),  # suit, mission patch, zip
    "camera": Photo("camera.png", (140, 60, 220), True),  # head, hands, camera
    "chelsea": Photo("chelsea.png", (100, 30, 240), False),  # cat's eyes and fur
    "coffee": Photo("coffee.png", (140, 10, 300), False),  # cup, crema, spoon
    "rocket": Photo("rocket.jpg", (230, 120, 220), False),  # rocket and launch tower lattice
    "coins": Photo("coins.png", (100, 90, 200), True),  # rows of coins
    "text": Photo("text.png", (150, 10, 150), True),  # handwriting on squared paper
    "page": Photo("page.png", (120, 35, 150), True),  # printed text
    "hubble_deep_field": Photo("hubble_deep_field.jpg", (200, 300, 300), False),  # galaxies
    "retina": Photo("retina.jpg", (100, 400, 480), False),  # optic disc and vessels
    "motorcycle": Photo("motorcycle_left.png", (300, 220, 200), False),  # engine (stereo_motorcycle, left)
}
CATEGORIES = tuple(PHOTOS)


def check_allowed(name: str) -> str:
    """Raise ``ValueError`` for a reserved image (by name or file name); return ``name`` otherwise."""
    if name in RESERVED or name in _RESERVED_FILES or Path(name).stem in (*RESERVED, "ihc"):
        raise ValueError(f"{name!r} is reserved for an independent check and must not be used")
    return name


def _skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage.data")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("scikit-image is not installed (pip install 'scikit-image>=0.22')")
    return Path(spec.origin).parent


@cache
def load_photo(name: str) -> Image.Image:
    """The photograph behind ``name`` as RGB, read from the wheel's own file (never downloaded)."""
    check_allowed(name)
    if name not in PHOTOS:
        raise ValueError(f"unknown photograph {name!r}; choose from {', '.join(CATEGORIES)}")
    path = _skimage_data_dir() / check_allowed(PHOTOS[name].file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not bundled with this scikit-image install")
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _gray(image: np.ndarray) -> np.ndarray:
    lum = image @ np.array([0.299, 0.587, 0.114], dtype=image.dtype)
    return np.repeat(lum[..., None], 3, axis=-1)


def _rng(seed: int, category: str, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), stream, index])


def capture(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One normal image: a jittered crop of the category's region, resized, with lighting and sensor noise."""
    photo = PHOTOS[category]
    source = load_photo(category)
    x, y, side = photo.region
    crop = side * rng.uniform(0.95, 1.05)
    cx = x + side / 2 + rng.uniform(-0.04, 0.04) * side
    cy = y + side / 2 + rng.uniform(-0.04, 0.04) * side
    x0 = float(np.clip(cx - crop / 2, 0, source.width - crop))
    y0 = float(np.clip(cy - crop / 2, 0, source.height - crop))
    image = source.resize((size, size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + crop, y0 + crop))
    a = np.asarray(image, dtype=np.float32) / 255.0
    mean = a.mean()
    a = (a - mean) * rng.uniform(0.9, 1.1) + mean  # contrast
    a = a * rng.uniform(0.92, 1.08) + rng.uniform(-0.03, 0.03)  # exposure
    if not photo.gray:
        a = a * rng.uniform(0.98, 1.02, 3).astype(np.float32)  # white balance
    noise = rng.normal(0.0, rng.uniform(0.004, 0.012), (size, size, 1 if photo.gray else 3))
    return _to_uint8(a + noise.astype(np.float32))


# --- defects ---------------------------------------------------------------------------------
# Each draws its geometry and returns (target, alpha): the defective look and how much of it
# covers each pixel. ``apply_defect`` blends, puts back invisible changes and derives the mask.


@dataclass(frozen=True)
class _Scene:
    category: str
    size: int
    gray: bool


def _area_px(rng: np.random.Generator, size: int) -> float:
    low = max(0.002, 6 / size**2)
    return math.exp(rng.uniform(math.log(low), math.log(0.08))) * size**2


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _irregular_blob(rng: np.random.Generator, size: int, area: float, soft: float) -> tuple[np.ndarray, float]:
    """Coverage of an elongated, wobbly closed shape of about ``area`` pixels; also its mean radius."""
    k = np.arange(2, 6)
    amp = rng.uniform(0.0, 0.22, k.size) / np.sqrt(k - 1)
    phase = rng.uniform(0, 2 * np.pi, k.size)
    radius = math.sqrt(area / (math.pi * (1 + 0.5 * float(np.sum(amp**2)))))
    aspect, angle = rng.uniform(1.0, 2.2), rng.uniform(0, np.pi)
    margin = min(radius * 0.7, size / 2)
    cy, cx = rng.uniform(margin, size - margin, 2)
    yy, xx = _grid(size)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / math.sqrt(aspect)
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) * math.sqrt(aspect)
    theta = np.arctan2(v, u)
    edge = radius * (1 + np.sum(amp[:, None, None] * np.cos(k[:, None, None] * theta + phase[:, None, None]), 0))
    return np.clip((edge - np.hypot(u, v)) / soft + 0.5, 0.0, 1.0), radius


def _mean_under(image: np.ndarray, alpha: np.ndarray) -> float:
    inside = alpha >= 0.5
    return float(image[inside].mean()) if inside.any() else float(image.mean())


def _patch(image, rng, scene):
    alpha, _ = _irregular_blob(rng, scene.size, _area_px(rng, scene.size), max(0.6, scene.size / 80))
    rows, cols = np.nonzero(alpha > 0)
    if rows.size == 0:  # too small to cover a pixel centre: nothing changes and the caller draws again
        return image, alpha
    y0, x0 = int(rows.min()), int(cols.min())
    box = max(int(rows.max()) - y0, int(cols.max()) - x0) + 1
    donors = [n for n in CATEGORIES if n != scene.category]
    donor = load_photo(check_allowed(donors[int(rng.integers(len(donors)))]))
    side = min(box * rng.uniform(1.5, 5.0), donor.width, donor.height)
    dx, dy = rng.uniform(0, donor.width - side), rng.uniform(0, donor.height - side)
    piece = donor.resize((box, box), Image.Resampling.BICUBIC, box=(dx, dy, dx + side, dy + side))
    target = image.copy()
    h, w = min(box, scene.size - y0), min(box, scene.size - x0)
    target[y0:y0 + h, x0:x0 + w] = (np.asarray(piece, dtype=np.float32) / 255.0)[:h, :w]
    return target, alpha


def _bezier_distance(size: int, points: np.ndarray) -> np.ndarray:
    """Distance from each pixel centre to the polyline through ``points`` ((n, 2) as y, x)."""
    yy, xx = _grid(size)
    p = np.stack([yy.ravel(), xx.ravel()], 1)[:, None, :]
    a, b = points[None, :-1], points[None, 1:]
    ab = b - a
    t = np.clip(np.sum((p - a) * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-9), 0, 1)
    nearest = a + t[..., None] * ab
    return np.sqrt(np.min(np.sum((p - nearest) ** 2, -1), 1)).reshape(size, size)


def _scratch(image, rng, scene):
    size = scene.size
    length = size * rng.uniform(0.15, 0.55)
    angle = rng.uniform(0, 2 * np.pi)
    start = rng.uniform(0.1 * size, 0.9 * size, 2)
    end = np.clip(start + length * np.array([math.sin(angle), math.cos(angle)]), 0, size)
    bend = (start + end) / 2 + rng.uniform(-0.3, 0.3) * length * np.array([math.cos(angle), -math.sin(angle)])
    t = np.linspace(0, 1, 40)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
    width = max(0.7, size / 64 * rng.uniform(0.6, 1.6))
    alpha = np.clip(width / 2 + 0.5 - _bezier_distance(size, curve), 0.0, 1.0)
    level = rng.uniform(0.85, 1.0) if _mean_under(image, alpha) < 0.5 else rng.uniform(0.0, 0.15)
    colour = np.clip(level + rng.uniform(-0.03, 0.03, 3), 0, 1)
    return np.broadcast_to(colour.astype(np.float32), image.shape), alpha


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    hi, lo = rgb.max(-1), rgb.min(-1)
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    r, g, b = np.moveaxis(rgb, -1, 0)
    hue = np.where(hi == r, (g - b) / safe, np.where(hi == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = np.where(span > 0, (hue / 6) % 1.0, 0.0)
    return np.stack([hue, np.where(hi > 0, span / np.where(hi > 0, hi, 1), 0), hi], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = np.moveaxis(hsv, -1, 0)
    k = (np.array([5.0, 3.0, 1.0])[:, None, None] + h * 6) % 6
    return np.moveaxis(v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1), 0, -1).astype(np.float32)


def _discolour(image, rng, scene):
    alpha, _ = _irregular_blob(rng, scene.size, _area_px(rng, scene.size), 1.0)
    hsv = _rgb_to_hsv(image)
    sign = 1.0 if _mean_under(image, alpha) < 0.5 else -1.0
    hue = (hsv[..., 0] + rng.choice([-1, 1]) * rng.uniform(0.08, 0.5)) % 1.0
    sat = np.clip(np.maximum(hsv[..., 1] * rng.uniform(0.6, 1.6), rng.uniform(0.25, 0.6)), 0, 1)
    val = np.clip(hsv[..., 2] * rng.uniform(0.85, 1.15) + sign * rng.uniform(0.06, 0.18), 0, 1)
    return _hsv_to_rgb(np.stack([hue, sat, val], -1)), alpha


def _smudge(image, rng, scene):
    size = scene.size
    alpha, radius = _irregular_blob(rng, size, _area_px(rng, size), 1.0)
    alpha = ndimage.gaussian_filter(alpha, max(0.5, radius * 0.15))  # a smear has no sharp border
    sigma = max(0.8, size / 64 * rng.uniform(1.0, 2.5))
    blurred = ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="nearest")
    angle, reach = rng.uniform(0, 2 * np.pi), size / 64 * rng.uniform(2.0, 6.0)
    steps = np.linspace(0, reach, 6)
    smear = np.mean([ndimage.shift(blurred, (s * math.sin(angle), s * math.cos(angle), 0), order=1, mode="nearest")
                     for s in steps], 0)
    grease = rng.uniform(0.2, 0.5) * np.array([1.0, 0.93, 0.82], dtype=np.float32)
    weight = rng.uniform(0.25, 0.45)
    return (1 - weight) * smear + weight * grease, alpha


def _hole(image, rng, scene):
    size = scene.size
    alpha, _ = _irregular_blob(rng, size, _area_px(rng, size), 0.6)
    # Dark where the surface is light; lit from behind where it is dark already.
    level = rng.uniform(0.02, 0.10) if _mean_under(image, alpha) >= 0.3 else rng.uniform(0.7, 0.9)
    grain = ndimage.gaussian_filter(rng.normal(0, 0.04, (size, size)), 1.0)
    tint = rng.uniform(0.95, 1.05, 3)
    return np.clip((level + grain)[..., None] * tint, 0, 1).astype(np.float32), alpha


DEFECTS: dict[str, Callable] = {
    "patch": _patch, "scratch": _scratch, "discolour": _discolour, "smudge": _smudge, "hole": _hole,
}


def apply_defect(clean: np.ndarray, kind: str, rng: np.random.Generator, scene: _Scene,
                 attempts: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """``clean`` (uint8) with one ``kind`` defect, and its mask (bool): exactly the pixels that changed.

    A defect whose visible part is under ``MIN_DEFECT_PIXELS``, over ``MAX_AREA_FRACTION`` of the image,
    or less than half its drawn shape (it landed on look-alike content) is drawn again.
    """
    image = clean.astype(np.float32) / 255.0
    limit = MAX_AREA_FRACTION * scene.size**2
    for _ in range(attempts):
        target, alpha = DEFECTS[kind](image, rng, scene)
        if scene.gray:
            target = _gray(target)
        blended = _to_uint8(alpha[..., None] * target + (1 - alpha[..., None]) * image)
        delta = np.abs(blended.astype(np.int16) - clean.astype(np.int16)).max(-1)
        mask = (alpha > 0) & (delta >= MIN_DELTA)
        count = int(mask.sum())
        if MIN_DEFECT_PIXELS <= count <= limit and count >= 0.5 * int((alpha >= 0.5).sum()):
            result = np.where(mask[..., None], blended, clean)
            changed = (result != clean).any(-1)
            if not np.array_equal(changed, mask):  # every masked pixel changed, no other one did
                raise AssertionError(f"{kind}: mask differs from the changed pixels")
            return result, mask
    raise RuntimeError(f"could not place a visible {kind} defect on {scene.category} in {attempts} attempts")


# --- samples ---------------------------------------------------------------------------------


def render_normal(category: str, split: str, index: int, seed: int = 0, image_size: int = 64) -> np.ndarray:
    """Normal image ``index`` of ``split`` ("train" or "test") as uint8 H x W x 3."""
    return capture(category, _rng(seed, category, ("train", "test").index(split), index), image_size)


def render_anomalous(category: str, index: int, seed: int = 0,
                     image_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Anomalous test image ``index``: ``(clean, defective, mask, kind)``; kinds take turns by index."""
    rng = _rng(seed, category, 2, index)
    kind = DEFECT_KINDS[index % len(DEFECT_KINDS)]
    clean = capture(category, rng, image_size)
    defective, mask = apply_defect(clean, kind, rng, _Scene(category, image_size, PHOTOS[category].gray))
    return clean, defective, mask, kind


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_category(root: Path, category: str, seed: int, size: int, train: int, test: int) -> dict:
    good, anomalous = test - test // 2, test // 2
    for split, n in (("train", train), ("test", good)):
        folder = root / category / split / NORMAL_DEFECT
        for i in range(n):
            _save(render_normal(category, split, i, seed, size), folder / f"{i:03d}.png")
    kinds: dict[str, int] = {}
    for i in range(anomalous):
        _, image, mask, kind = render_anomalous(category, i, seed, size)
        _save(image, root / category / "test" / kind / f"{i:03d}.png")
        _save(np.where(mask, 255, 0).astype(np.uint8), root / category / "ground_truth" / kind / f"{i:03d}_mask.png")
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"train": train, "test_good": good, "test_anomalous": anomalous, "defects": kinds}


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def is_photo_benchmark(path: str | Path) -> bool:
    """True only for a real folder holding this generator's marker and nothing but its categories."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not (path / MARKER).is_file():
        return False
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("generator") != GENERATOR:
        return False
    allowed = {MARKER, *marker.get("categories", [])}
    return all(entry.name in allowed for entry in path.iterdir())


def _validate(categories: list[str], seed: int, image_size: int, train: int, test: int) -> None:
    for name in categories:
        check_allowed(name)
        if name not in PHOTOS:
            raise ValueError(f"unknown category {name!r}; choose from {', '.join(CATEGORIES)}")
    if not categories or len(set(categories)) != len(categories):
        raise ValueError(f"categories must be distinct and not empty, got {categories}")
    if not MIN_SIZE <= image_size <= MAX_SIZE:
        raise ValueError(f"image size must be within {MIN_SIZE}..{MAX_SIZE}, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if train < 1 or test < 2:
        raise ValueError(f"need at least 1 training and 2 test images per category, got {train} and {test}")


def make_photo_benchmark(out: str | Path, categories: list[str] | tuple[str, ...] | None = None, seed: int = 0,
                         image_size: int = 64, train_per_category: int = 40, test_per_category: int = 20,
                         overwrite: bool = False) -> dict:
    """Write the benchmark to ``out`` (MVTec AD layout) and return counts per category and defect kind.

    An existing ``out`` is replaced only with ``overwrite`` and only if this function wrote it.
    """
    out = Path(out)
    if isinstance(categories, str):
        categories = categories.split(",")
    categories = list(CATEGORIES if categories is None else categories)
    _validate(categories, seed, image_size, train_per_category, test_per_category)
    if _inside(out, _skimage_data_dir()):
        raise ValueError(f"{out} is inside scikit-image's data folder; the source is never written")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
        if not is_photo_benchmark(out):
            raise OutputExistsError(f"{out} was not written by make_photo_benchmark (no {MARKER} or foreign "
                                    "files in it); refusing to replace it")
    tmp = staging_directory(out)
    try:
        counts = {c: _write_category(tmp, c, seed, image_size, train_per_category, test_per_category)
                  for c in categories}
        defects = {k: sum(c["defects"].get(k, 0) for c in counts.values()) for k in DEFECT_KINDS}
        settings = {"generator": GENERATOR, "layout": "mvtec", "seed": seed, "image_size": image_size,
                    "categories": categories, "train_per_category": train_per_category,
                    "test_per_category": test_per_category, "defect_kinds": list(DEFECT_KINDS),
                    "reserved": list(RESERVED)}
        write_json_atomic(tmp / MARKER, settings)
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(c["train"] + c["test_good"] + c["test_anomalous"] for c in counts.values())
    return {"out": str(out), "total": total, "categories": counts, "defects": defects, "image_size": image_size,
            "seed": seed}
