"""Procedural multi-category anomaly dataset: the project's embedded default data.

Each category is a texture family (fractal noise, stripes, grid, weave, dots, wood grain) or an
object family (nut, screw, capsule, ring) with its own colours, frequencies and shapes, drawn from
a seed. Normal images vary the way photographs of one product line do: small shifts and rotations,
lighting gain, offset and gradient, sensor noise. Anomalies come in five kinds with exact pixel
masks (the pixels the defect changed): scratch, stain, hole, foreign patch, local deformation,
covering from a few pixels to about 10% of the image, in the spirit of MVTec AD's defect types.

Everything is a pure function of ``(seed, category, split, index)``, so the output does not depend
on how the work is spread over processes.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

TEXTURE_FAMILIES = ("noise", "stripes", "grid", "weave", "dots", "wood")
OBJECT_FAMILIES = ("nut", "screw", "capsule", "ring")
FAMILIES = TEXTURE_FAMILIES + OBJECT_FAMILIES
ANOMALY_KINDS = ("scratch", "stain", "hole", "foreign", "deformation")
MIN_AREA_FRACTION, MAX_AREA_FRACTION = 0.0015, 0.10


@dataclass(frozen=True)
class CategorySpec:
    """The fixed look of one synthetic category."""

    name: str
    family: str
    index: int
    colors: tuple[tuple[float, float, float], ...]
    params: dict[str, float] = field(default_factory=dict)


def _random_color(rng: np.random.Generator, value: tuple[float, float]) -> tuple[float, float, float]:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.25, 0.85), rng.uniform(*value)
    return colorsys.hsv_to_rgb(h, s, v)


def category_specs(n: int, seed: int = 0) -> list[CategorySpec]:
    """``n`` distinct categories, families in turn, parameters drawn from ``(seed, index)``."""
    if n < 1:
        raise ValueError(f"need at least one category, got {n}")
    specs = []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        rng = np.random.default_rng([seed, i, 7919])
        dark, light = _random_color(rng, (0.15, 0.45)), _random_color(rng, (0.6, 0.95))
        params = {
            "frequency": float(rng.uniform(3, 12)),
            "angle": float(rng.uniform(0, np.pi)),
            "sharpness": float(rng.uniform(1, 6)),
            "octaves": float(rng.integers(2, 5)),
            "persistence": float(rng.uniform(0.4, 0.7)),
            "cell": float(rng.uniform(0.12, 0.25)),
            "radius": float(rng.uniform(0.18, 0.32)),
            "ratio": float(rng.uniform(0.3, 0.6)),
            "length": float(rng.uniform(0.5, 0.75)),
            "sides": float(rng.choice([0, 6, 8])),
            "hex": float(rng.integers(0, 2)),
        }
        background = _random_color(rng, (0.05, 0.35)) if family in OBJECT_FAMILIES else dark
        specs.append(CategorySpec(f"{family}-{i:03d}", family, i, (background, light, dark), params))
    return specs


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coords, coords, indexing="xy")


def _smoothstep(edge: float, x: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - x / edge, 0.0, 1.0)


def _fractal(rng: np.random.Generator, size: int, base: float, octaves: int, persistence: float) -> np.ndarray:
    """Sum of octaves of smoothly upsampled white noise, scaled to [0, 1]."""
    total = np.zeros((size, size), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        cells = max(2, int(base * 2**octave))
        coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
        total += amplitude * ndimage.zoom(coarse, size / (cells + 1), order=1, grid_mode=True, mode="nearest")[
            :size, :size
        ]
        amplitude *= persistence
    lo, hi = total.min(), total.max()
    return (total - lo) / max(hi - lo, 1e-6)


def _mix(t: np.ndarray, a: tuple, b: tuple) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + t[..., None] * (b - a)


def _texture(spec: CategorySpec, rng: np.random.Generator, size: int) -> np.ndarray:
    p, (_, light, dark) = spec.params, spec.colors
    x, y = _grid(size)
    # Normal variation: the pattern shifts by a random phase and turns by up to 3 degrees.
    x, y = x + rng.uniform(0, 1), y + rng.uniform(0, 1)
    angle = p["angle"] + np.deg2rad(rng.uniform(-3, 3))
    u, v = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    f = p["frequency"]
    if spec.family == "noise":
        t = _fractal(rng, size, f / 2, int(p["octaves"]), p["persistence"])
    elif spec.family == "stripes":
        t = 0.5 + 0.5 * np.tanh(p["sharpness"] * np.sin(2 * np.pi * f * u))
    elif spec.family == "grid":
        lines = np.maximum(np.cos(2 * np.pi * f * u), np.cos(2 * np.pi * f * v))
        t = 1 - np.clip((lines - 0.8) * 5, 0, 1)
    elif spec.family == "weave":
        cell = p["cell"]
        checker = (np.floor(u / cell) + np.floor(v / cell)) % 2
        thread_u = 0.5 + 0.5 * np.cos(2 * np.pi * 2 * u / cell)
        thread_v = 0.5 + 0.5 * np.cos(2 * np.pi * 2 * v / cell)
        t = np.where(checker > 0, thread_u, thread_v) * 0.8 + 0.1
    elif spec.family == "dots":
        spacing = 1.0 / f
        row = np.floor(v / spacing)
        shifted = u + (row % 2) * spacing / 2 * p["hex"]
        du = (shifted % spacing) / spacing - 0.5
        dv = (v % spacing) / spacing - 0.5
        t = _smoothstep(0.08, np.hypot(du, dv) - 0.35 * p["ratio"] - 0.1)
    elif spec.family == "wood":
        turbulence = _fractal(rng, size, 3, 3, 0.5)
        rings = np.hypot(u * 0.3, v - 2.0) * f * 2 + 1.5 * turbulence
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rings) ** 3
    else:
        raise ValueError(f"{spec.name}: unknown texture family {spec.family!r}")
    return _mix(t.astype(np.float32), dark, light)


def _object(spec: CategorySpec, rng: np.random.Generator, size: int) -> np.ndarray:
    p, (background, light, dark) = spec.params, spec.colors
    x, y = _grid(size)
    # Normal variation: the part sits up to 4% off centre and turned by up to 6 degrees.
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04, size=2)
    angle = p["angle"] + np.deg2rad(rng.uniform(-6, 6))
    dx, dy = x - cx, y - cy
    u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    r = np.hypot(u, v)
    edge = 1.5 / size
    shade = 1.0
    if spec.family == "nut":
        sides = int(p["sides"]) or 6
        sector = np.pi / sides
        polar = np.mod(np.arctan2(v, u), 2 * sector) - sector
        outer = r * np.cos(polar) - p["radius"] * np.cos(sector)
        body = _smoothstep(edge, outer) * (1 - _smoothstep(edge, r - p["radius"] * p["ratio"] * 0.8))
        shade = 0.85 + 0.15 * np.cos(3 * polar)
    elif spec.family == "screw":
        half = p["length"] / 2
        shaft = np.maximum(np.abs(u) - half, np.abs(v) - 0.045)
        head = np.hypot(u + half, v) - 0.09
        body = _smoothstep(edge, np.minimum(shaft, head))
        thread = 0.75 + 0.25 * np.cos(2 * np.pi * u * p["frequency"] * 4)
        shade = np.where(u > -half + 0.05, thread, 1.0)
    elif spec.family == "capsule":
        half = p["length"] / 2 - 0.1
        capsule = np.hypot(np.maximum(np.abs(u) - half, 0), v) - 0.12
        body = _smoothstep(edge, capsule)
        shade = np.where(u > 0, 1.0, 0.6)
    elif spec.family == "ring":
        thickness = 0.04 + 0.08 * p["ratio"]
        body = _smoothstep(edge, np.abs(r - p["radius"]) - thickness)
        shade = 0.8 + 0.2 * np.cos(np.arctan2(v, u) * 2)
    else:
        raise ValueError(f"{spec.name}: unknown object family {spec.family!r}")
    part = _mix(np.broadcast_to(shade, body.shape).astype(np.float32), dark, light)
    canvas = np.broadcast_to(np.asarray(background, np.float32), part.shape)
    return canvas + body[..., None] * (part - canvas)


def render_float(spec: CategorySpec, rng: np.random.Generator, size: int) -> np.ndarray:
    """A normal image as float32 H x W x 3 in [0, 1], with lighting and sensor noise."""
    base = _texture(spec, rng, size) if spec.family in TEXTURE_FAMILIES else _object(spec, rng, size)
    x, y = _grid(size)
    gain = rng.uniform(0.92, 1.08)
    gradient = rng.uniform(-0.04, 0.04) * (x - 0.5) + rng.uniform(-0.04, 0.04) * (y - 0.5)
    image = base * gain + rng.uniform(-0.03, 0.03) + gradient[..., None]
    image += rng.normal(0.0, rng.uniform(0.005, 0.015), image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_normal(spec: CategorySpec, rng: np.random.Generator, size: int) -> np.ndarray:
    """A normal image as H x W x 3 uint8."""
    return to_uint8(render_float(spec, rng, size))


# --- anomalies -------------------------------------------------------------------------------


def _defect_radius(rng: np.random.Generator, size: int) -> float:
    """Radius (pixels) of a blob covering a log-uniform fraction of the image, from tiny to ~10%."""
    fraction = np.exp(rng.uniform(np.log(MIN_AREA_FRACTION), np.log(MAX_AREA_FRACTION)))
    return float(np.sqrt(fraction * size * size / np.pi))


def _blob(rng: np.random.Generator, size: int, radius: float, center: tuple[float, float]) -> np.ndarray:
    """An irregular closed region: an ellipse whose boundary is wobbled by low-frequency noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.5, 1.0)
    dx, dy = xx - center[0], yy - center[1]
    u, v = dx * np.cos(theta) + dy * np.sin(theta), (-dx * np.sin(theta) + dy * np.cos(theta)) / aspect
    angle = np.arctan2(v, u)
    wobble = sum(rng.uniform(0, 0.15) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.hypot(u, v) <= radius * np.sqrt(aspect) * (1 + wobble)


def _center(rng: np.random.Generator, size: int, radius: float, image: np.ndarray | None = None) -> tuple:
    """A defect centre inside the image; with ``image``, prefer the most structured of a few candidates."""
    margin = min(radius + 2, size / 2 - 1)
    candidates = rng.uniform(margin, size - margin, size=(6, 2))
    if image is None:
        return tuple(candidates[0])
    detail = ndimage.generic_gradient_magnitude(image.mean(axis=2), ndimage.sobel)
    detail = ndimage.uniform_filter(detail, size=max(3, int(radius)))
    scores = [detail[int(cy), int(cx)] for cx, cy in candidates]
    return tuple(candidates[int(np.argmax(scores))])


def _random_blob(rng: np.random.Generator, size: int) -> np.ndarray:
    radius = _defect_radius(rng, size)
    return _blob(rng, size, radius, _center(rng, size, radius))


def _scratch(image, rng, donor):
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    length = _defect_radius(rng, size) * rng.uniform(2.5, 5)
    width = rng.uniform(0.6, 1.6) * max(1.0, size / 128)
    points = [np.asarray(_center(rng, size, 0))]
    heading = rng.uniform(0, 2 * np.pi)
    for _ in range(rng.integers(1, 4)):
        heading += rng.uniform(-0.6, 0.6)
        step = length / 3 * np.array([np.cos(heading), np.sin(heading)])
        points.append(np.clip(points[-1] + step, 1, size - 2))
    distance = np.full((size, size), np.inf, np.float32)
    for a, b in zip(points[:-1], points[1:], strict=True):
        ab = b - a
        t = np.clip(((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / max(ab @ ab, 1e-6), 0, 1)
        distance = np.minimum(distance, np.hypot(xx - a[0] - t * ab[0], yy - a[1] - t * ab[1]))
    mask = distance <= width
    brightness = image[mask].mean() if mask.any() else 0.5
    color = 0.05 if brightness > 0.5 else 0.95
    out = image.copy()
    out[mask] = color + rng.normal(0, 0.02, (int(mask.sum()), 3))
    return out, mask


def _stain(image, rng, donor):
    mask = _random_blob(rng, image.shape[0])
    color = np.asarray(_random_color(rng, (0.1, 0.9)), np.float32)
    if np.abs(image[mask].mean(axis=0) - color).max() < 0.25:
        color = 1 - color
    alpha = rng.uniform(0.55, 0.85)
    out = image.copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * color
    return out, mask


def _hole(image, rng, donor):
    mask = _random_blob(rng, image.shape[0])
    inside = 0.03 if image[mask].mean() > 0.3 else 0.9
    out = image.copy()
    out[mask] = inside + rng.normal(0, 0.015, (int(mask.sum()), 3))
    return out, mask


def _foreign(image, rng, donor):
    mask = _random_blob(rng, image.shape[0])
    if donor is None or donor.shape != image.shape:
        tint = np.asarray(_random_color(rng, (0.5, 1)), np.float32)
        donor = _fractal(rng, image.shape[0], 6, 3, 0.5)[..., None] * tint
    patch = donor[mask]
    if np.abs(patch - image[mask]).mean() < 0.15:  # a donor that happens to look alike: invert its tones
        patch = 1.0 - patch if image[mask].mean() < 0.5 else patch * 0.3
    out = image.copy()
    out[mask] = patch
    return out, mask


def _deformation(image, rng, donor):
    """A local swirl-and-bulge of the surface; the mask is the pixels the warp visibly changed."""
    size = image.shape[0]
    radius = max(_defect_radius(rng, size) * 1.3, 3.0)
    cx, cy = _center(rng, size, radius, image)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    falloff = np.clip(1 - r / radius, 0, 1) ** 2
    twist = rng.choice([-1, 1]) * rng.uniform(1.0, 2.5) * falloff
    pinch = 1 - rng.uniform(0.2, 0.5) * falloff
    sx = cx + pinch * (dx * np.cos(twist) - dy * np.sin(twist))
    sy = cy + pinch * (dx * np.sin(twist) + dy * np.cos(twist))
    out = np.stack(
        [ndimage.map_coordinates(image[..., c], [sy, sx], order=1, mode="reflect") for c in range(3)], axis=-1
    )
    mask = (np.abs(out - image).max(axis=2) > 0.06) & (r < radius)
    mask = ndimage.binary_closing(mask, iterations=1) & (r < radius)
    out = np.where(mask[..., None], out, image)
    return out.astype(np.float32), mask


_ANOMALIES = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
    "foreign": _foreign,
    "deformation": _deformation,
}
MIN_MASK_PIXELS = 4


def paste_anomaly_float(
    image: np.ndarray, rng: np.random.Generator, kind: str | None = None, donor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Add one defect to a float image; returns (image, mask, kind). Falls back to a stain when the
    drawn defect would change fewer than ``MIN_MASK_PIXELS`` pixels (a swirl on a flat area)."""
    if kind is not None and kind not in _ANOMALIES:
        raise ValueError(f"unknown anomaly kind {kind!r}; choose from {ANOMALY_KINDS}")
    kind = kind or str(rng.choice(ANOMALY_KINDS))
    out, mask = _ANOMALIES[kind](image, rng, donor)
    if mask.sum() < MIN_MASK_PIXELS:
        kind = "stain"
        out, mask = _stain(image, rng, donor)
    return np.clip(out, 0, 1).astype(np.float32), mask, kind


def paste_anomaly(
    image: np.ndarray, rng: np.random.Generator, kind: str | None = None, donor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Add one defect to an H x W x 3 uint8 image; returns (uint8 image, H x W bool mask)."""
    as_float = image.astype(np.float32) / 255
    donor_float = donor.astype(np.float32) / 255 if donor is not None else None
    out, mask, _ = paste_anomaly_float(as_float, rng, kind, donor_float)
    return to_uint8(out), mask


@dataclass(frozen=True)
class SyntheticSample:
    category: str
    split: str
    index: int
    image: np.ndarray
    mask: np.ndarray | None
    defect_type: str

    @property
    def label(self) -> int:
        return int(self.mask is not None)


def category_samples(
    specs: list[CategorySpec],
    index: int,
    seed: int,
    size: int,
    train: int,
    test: int,
    anomalous_fraction: float = 0.5,
):
    """Yield one category's train normals, then test normals and anomalies (a fixed fraction)."""
    spec = specs[index]
    anomalous = round(test * anomalous_fraction)
    split_counts = {"train": (train, 0), "test": (test - anomalous, anomalous)}
    for split_code, (split, (normal, defective)) in enumerate(split_counts.items()):
        for i in range(normal + defective):
            rng = np.random.default_rng([seed, spec.index, split_code, i])
            image = render_float(spec, rng, size)
            if i < normal:
                yield SyntheticSample(spec.name, split, i, to_uint8(image), None, "good")
                continue
            donor_spec = specs[(index + 1 + int(rng.integers(len(specs)))) % len(specs)]
            donor = render_float(donor_spec, rng, size) if donor_spec is not spec else None
            image, mask, kind = paste_anomaly_float(image, rng, donor=donor)
            yield SyntheticSample(spec.name, split, i, to_uint8(image), mask, kind)


# --- the dataset -----------------------------------------------------------------------------


def _category_records(job: tuple) -> list:
    from anomdiff.data.images import encode_png
    from anomdiff.data.schema import Record

    specs, index, seed, size, train, test = job
    records = []
    for s in category_samples(specs, index, seed, size, train, test):
        records.append(Record(
            f"{s.category}/{s.split}/{s.index:05d}", s.category, s.split, s.label, s.defect_type,
            encode_png(s.image), encode_png((s.mask * 255).astype(np.uint8)) if s.mask is not None else None,
            size, size, f"synthetic:seed={seed}:{s.category}:{s.split}:{s.index}"))
    return records


def synthesize(out, categories: int, seed: int = 0, image_size: int = 128, train_per_category: int = 40,
               test_per_category: int = 20, shard_mb: float = 128, overwrite: bool = False,
               workers: int | None = None) -> dict:
    """Write a synthetic dataset of ``categories`` categories to ``out``; returns the manifest."""
    import os

    from anomdiff.data.convert import parallel_map
    from anomdiff.data.writer import DatasetWriter

    if train_per_category < 1:
        raise ValueError("each category needs at least one training image")
    specs = category_specs(categories, seed)
    workers = workers or os.cpu_count() or 1
    extra = {"source_format": "synthetic", "seed": seed}
    with DatasetWriter(out, image_size, shard_mb, overwrite, extra=extra) as writer:
        jobs = ((specs, i, seed, image_size, train_per_category, test_per_category) for i in range(categories))
        for records in parallel_map(_category_records, jobs, categories, workers, "synthesize", "category"):
            for record in records:
                writer.add(record)
    return writer.manifest
