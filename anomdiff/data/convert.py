"""Converters from the public dataset layouts to anomdiff's sharded parquet (README, "Data").

Each ``scan_<format>`` reads one layout exactly and lists :class:`SourceSample` entries without
opening any image; :func:`convert` then loads, checks, resizes and encodes them on all cores and
hands them to :class:`~anomdiff.data.writer.DatasetWriter`. The source tree is only ever read.

Bad input (unreadable or truncated image, anomalous sample without mask, mask of another size,
category without training images) stops the conversion with a :class:`BadSampleError` naming the
file; with ``skip_bad`` such samples are left out and listed in ``OUT/rejected.jsonl``.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from anomdiff.data.images import BadSampleError, encode_png, load_mask, load_rgb, resize_pair
from anomdiff.data.schema import NORMAL_DEFECT, REJECTED_NAME, Record
from anomdiff.data.writer import DatasetWriter, check_output

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
FORMATS = ("mvtec", "visa", "realiad", "folder")


class LayoutError(ValueError):
    """The source folder does not have the layout of the requested format."""


@dataclass(frozen=True)
class SourceSample:
    sample_id: str
    category: str
    split: str
    label: int
    defect_type: str
    image_path: Path
    mask_path: Path | None
    view: int | None = None


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    # Hidden files (macOS ``._*`` resource forks, editors' temporaries) are not images of the dataset.
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# --- layouts ---------------------------------------------------------------------------------


def scan_mvtec(src: Path, **_) -> list[SourceSample]:
    """MVTec AD: ``<cat>/train/good``, ``<cat>/test/<defect>``, ``<cat>/ground_truth/<defect>/<stem>_mask.png``."""
    categories = [d for d in _subdirs(src) if (d / "train").is_dir() and (d / "test").is_dir()]
    if not categories:
        raise LayoutError(f"{src}: no MVTec category folders (<cat>/train/good and <cat>/test/<defect>)")
    samples = []
    for cat_dir in categories:
        cat = cat_dir.name
        for path in _images_in(cat_dir / "train" / "good"):
            samples.append(SourceSample(f"{cat}/train/good/{path.stem}", cat, "train", 0, NORMAL_DEFECT, path, None))
        for defect_dir in _subdirs(cat_dir / "test"):
            defect = defect_dir.name
            for path in _images_in(defect_dir):
                label = int(defect != NORMAL_DEFECT)
                mask = cat_dir / "ground_truth" / defect / f"{path.stem}_mask.png" if label else None
                samples.append(SourceSample(f"{cat}/test/{defect}/{path.stem}", cat, "test", label, defect, path,
                                            mask))
    return samples


def scan_visa(src: Path, **_) -> list[SourceSample]:
    """VisA: ``split_csv/1cls.csv`` (object, split, label, image, mask; labels normal/anomaly)."""
    table = src / "split_csv" / "1cls.csv"
    if not table.is_file():
        raise LayoutError(f"{src}: no split_csv/1cls.csv, so this is not the VisA layout")
    samples = []
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
        if missing:
            raise LayoutError(f"{table}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            if None in row.values() or None in row:
                raise LayoutError(f"{table}:{line}: expected {len(reader.fieldnames)} fields, got a row of "
                                  f"{sum(v is not None for v in row.values()) + len(row.get(None) or [])}")
            split, label_name = row["split"].strip(), row["label"].strip()
            if split not in ("train", "test") or label_name not in ("normal", "anomaly"):
                raise LayoutError(f"{table}:{line}: split {split!r} / label {label_name!r} not understood")
            label = int(label_name == "anomaly")
            image = src / row["image"].strip()
            mask = src / row["mask"].strip() if label and row["mask"].strip() else None
            defect = "anomaly" if label else NORMAL_DEFECT
            sample_id = f"{row['object'].strip()}/{split}/{Path(row['image'].strip()).with_suffix('').as_posix()}"
            samples.append(SourceSample(sample_id, row["object"].strip(), split, label, defect, image, mask))
    return samples


_VIEW = re.compile(r"_C(\d+)_")
_RESOLUTION = re.compile(r"^realiad_(\d+|raw)$")


def _realiad_image_root(src: Path, category: str, image_size: int) -> Path:
    """The smallest ``realiad_<res>/<cat>`` at least ``image_size`` wide (else the largest there is)."""
    options = []
    for d in _subdirs(src):
        match = _RESOLUTION.match(d.name)
        if match and (d / category).is_dir():
            options.append((float("inf") if match[1] == "raw" else int(match[1]), d / category))
    if not options:
        raise LayoutError(f"{src}: no realiad_<resolution>/{category} image folder")
    options.sort()
    return next((p for res, p in options if res >= image_size), options[-1][1])


def scan_realiad(src: Path, image_size: int = 256, json_dir: str | Path | None = None, **_) -> list[SourceSample]:
    """Real-IAD / Real-IAD Variety: ``realiad_jsons/realiad_jsons/<cat>.json`` with train/test lists.

    ``anomaly_class == "OK"`` is normal; the camera view is the ``_C<k>_`` in the file name.
    """
    json_root = Path(json_dir) if json_dir else src / "realiad_jsons" / "realiad_jsons"
    if not json_root.is_absolute() and not json_root.is_dir():
        json_root = src / json_root
    files = sorted(json_root.glob("*.json")) if json_root.is_dir() else []
    if not files:
        raise LayoutError(f"{json_root}: no <category>.json split files, so this is not the Real-IAD layout")
    samples = []
    for file in files:
        try:
            meta = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise LayoutError(f"{file}: not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise LayoutError(f"{file}: expected an object with train and test lists, got {type(meta).__name__}")
        category = file.stem
        image_root = _realiad_image_root(src, category, image_size)
        for split in ("train", "test"):
            entries = meta.get(split, [])
            if not isinstance(entries, list):
                raise LayoutError(f"{file}: {split} must be a list, got {type(entries).__name__}")
            for k, entry in enumerate(entries):
                try:
                    label = int(entry["anomaly_class"] != "OK")
                    image_path = str(entry["image_path"])
                    mask_path = entry.get("mask_path") if label else None
                except (KeyError, TypeError, AttributeError) as exc:
                    raise LayoutError(f"{file}: {split}[{k}] lacks {exc}") from exc
                view = _VIEW.search(Path(image_path).name)
                samples.append(SourceSample(
                    f"{category}/{split}/{Path(image_path).with_suffix('').as_posix()}", category, split, label,
                    entry["anomaly_class"] if label else NORMAL_DEFECT, image_root / image_path,
                    image_root / mask_path if mask_path else None, int(view[1]) if view else None))
    return samples


def scan_folder(src: Path, test_normal_fraction: float = 0.2, **_) -> list[SourceSample]:
    """A plain folder: ``<cat>/good/*``, ``<cat>/<defect>/*``, masks in ``<cat>/masks/<defect>/<stem>.*``.

    Normal images go to test with probability ``test_normal_fraction``, decided by a hash of the
    file name, so the split is stable across runs and machines.
    """
    categories = [d for d in _subdirs(src) if (d / NORMAL_DEFECT).is_dir()]
    if not categories:
        raise LayoutError(f"{src}: no <category>/good folders, so this is not the folder layout")
    samples = []
    for cat_dir in categories:
        cat = cat_dir.name
        for path in _images_in(cat_dir / NORMAL_DEFECT):
            to_test = zlib.crc32(f"{cat}/{path.name}".encode()) % 1000 < test_normal_fraction * 1000
            split = "test" if to_test else "train"
            samples.append(SourceSample(f"{cat}/{split}/good/{path.stem}", cat, split, 0, NORMAL_DEFECT, path, None))
        for defect_dir in _subdirs(cat_dir):
            if defect_dir.name in (NORMAL_DEFECT, "masks"):
                continue
            masks = {p.stem.removesuffix("_mask"): p for p in _images_in(cat_dir / "masks" / defect_dir.name)}
            for path in _images_in(defect_dir):
                samples.append(SourceSample(f"{cat}/test/{defect_dir.name}/{path.stem}", cat, "test", 1,
                                            defect_dir.name, path, masks.get(path.stem)))
    return samples


SCANNERS: dict[str, Callable[..., list[SourceSample]]] = {
    "mvtec": scan_mvtec, "visa": scan_visa, "realiad": scan_realiad, "folder": scan_folder,
}


# --- loading ---------------------------------------------------------------------------------


def load_record(sample: SourceSample, image_size: int) -> Record:
    """Read, check, resize and encode one sample; raises :class:`BadSampleError` naming the file."""
    image = load_rgb(sample.image_path)
    mask = None
    if sample.label:
        if sample.mask_path is None or not sample.mask_path.is_file():
            where = sample.mask_path or "no mask path given"
            raise BadSampleError(sample.image_path, f"anomalous sample without a mask ({where})")
        mask = load_mask(sample.mask_path)
        if not mask.getbbox():
            raise BadSampleError(sample.mask_path, f"the mask of anomalous image {sample.image_path.name} is empty")
        if mask.size != image.size:
            raise BadSampleError(sample.mask_path, f"mask is {mask.size[0]}x{mask.size[1]} but its image "
                                                   f"{sample.image_path.name} is {image.size[0]}x{image.size[1]}")
    image, mask = resize_pair(image, mask, image_size)
    return Record(sample.sample_id, sample.category, sample.split, sample.label, sample.defect_type,
                  encode_png(image), encode_png(mask) if mask is not None else None, image_size, image_size,
                  str(sample.image_path), sample.view)


def _load_or_error(job: tuple[SourceSample, int]) -> Record | BadSampleError:
    try:
        return load_record(*job)
    except BadSampleError as exc:
        return exc


def parallel_map(fn: Callable, jobs: Iterable, total: int, workers: int, desc: str, unit: str = "img") -> Iterator:
    """``map(fn, jobs)`` in order on ``workers`` processes (in-process for one), with a progress bar."""
    bar = tqdm(total=total, desc=desc, unit=unit, disable=None, mininterval=1.0)
    if workers <= 1:
        for job in jobs:
            yield fn(job)
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for result in pool.imap(fn, jobs, chunksize=8):
                yield result
                bar.update()
    bar.close()


def convert(src: str | Path, out: str | Path, fmt: str, image_size: int = 256, skip_bad: bool = False,
            shard_mb: float = 128, overwrite: bool = False, workers: int | None = None,
            json_dir: str | None = None) -> dict:
    """Convert ``src`` (layout ``fmt``) into a dataset at ``out``; returns the manifest."""
    src, out = Path(src), Path(out)
    if fmt not in SCANNERS:
        raise LayoutError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if not src.is_dir():
        raise LayoutError(f"{src}: source folder does not exist")
    check_output(out, overwrite, sources=(src,))
    samples = SCANNERS[fmt](src, image_size=image_size, json_dir=json_dir)
    rejected: list[dict] = []
    samples = _confined(samples, src, skip_bad, rejected)
    samples = _drop_categories_without_training(samples, skip_bad, rejected)
    workers = workers or os.cpu_count() or 1
    with DatasetWriter(out, image_size, shard_mb, overwrite, extra={"source_format": fmt}, sources=(src,)) as writer:
        jobs = ((s, image_size) for s in samples)
        for sample, result in zip(samples, parallel_map(_load_or_error, jobs, len(samples), workers,
                                                        f"convert {fmt}"), strict=True):
            if isinstance(result, Record):
                writer.add(result)
            elif skip_bad:
                rejected.append({"sample_id": sample.sample_id, "path": result.path, "reason": result.reason})
            else:
                raise result
        writer.extra["rejected"] = len(rejected)
        if rejected:
            with open(writer.tmp / REJECTED_NAME, "w") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rejected)
    return writer.manifest


def _confined(samples: list[SourceSample], src: Path, skip_bad: bool, rejected: list[dict]) -> list[SourceSample]:
    """The samples whose image and mask resolve inside ``src``: a symlink or a path in a VisA CSV or
    Real-IAD JSON that leads elsewhere is refused (rejected with ``skip_bad``)."""
    root, kept = src.resolve(), []
    for sample in samples:
        outside = next((p for p in (sample.image_path, sample.mask_path)
                        if p is not None and not p.resolve().is_relative_to(root)), None)
        if outside is None:
            kept.append(sample)
            continue
        error = BadSampleError(outside, f"resolves to {outside.resolve()}, outside the source folder {src}")
        if not skip_bad:
            raise error
        rejected.append({"sample_id": sample.sample_id, "path": error.path, "reason": error.reason})
    return kept


def _drop_categories_without_training(samples: list[SourceSample], skip_bad: bool,
                                      rejected: list[dict]) -> list[SourceSample]:
    trained = {s.category for s in samples if s.split == "train"}
    empty = sorted({s.category for s in samples} - trained)
    if empty and not skip_bad:
        raise BadSampleError(f"category {empty[0]}", "has no training images"
                             + (f" (nor do {', '.join(empty[1:])})" if len(empty) > 1 else ""))
    for s in samples:
        if s.category in empty:
            rejected.append({"sample_id": s.sample_id, "path": str(s.image_path),
                             "reason": f"category {s.category} has no training images"})
    return [s for s in samples if s.category not in empty]
