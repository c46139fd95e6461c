"""Reading, summarising and verifying a converted dataset's manifest (``_manifest.json``)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq

from anomdiff.data.schema import MANIFEST_NAME, READABLE_SCHEMA_VERSIONS, SPLITS, manifest_path
from anomdiff.data.writer import sha256_of


class DatasetError(ValueError):
    """A dataset folder that is missing, malformed or corrupted; the message names the file."""


def read_manifest(root: str | Path) -> dict:
    """The dataset's manifest, its structure checked: every problem names the file and the key."""
    path = manifest_path(root)
    if path is None:
        raise DatasetError(f"{Path(root) / MANIFEST_NAME}: no manifest; is {root} a dataset written by "
                           "`anomdiff data convert/synth`?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    for key in ("schema_version", "image_size", "total", "counts", "shards"):
        if key not in manifest:
            raise DatasetError(f"{path}: missing key {key!r}")
    if manifest["schema_version"] not in READABLE_SCHEMA_VERSIONS:
        raise DatasetError(f"{path}: schema version {manifest['schema_version']}, this anomdiff reads "
                           + " and ".join(map(str, READABLE_SCHEMA_VERSIONS)))
    _check_structure(path, manifest)
    return manifest


def _count(path: Path, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DatasetError(f"{path}: {key} must be a count (an integer >= 0), got {value!r}")
    return value


def _check_structure(path: Path, manifest: dict) -> None:
    """Types of every field the readers use, shard paths confined to the dataset folder, and counts
    that add up to ``total``."""
    _count(path, "image_size", manifest["image_size"])
    counts = manifest["counts"]
    if not isinstance(counts, dict):
        raise DatasetError(f"{path}: counts must map each category to its counts, got {type(counts).__name__}")
    total = 0
    for category, per_split in counts.items():
        for split, labels in ((s, per_split.get(s) if isinstance(per_split, dict) else None) for s in SPLITS):
            if not isinstance(labels, dict):
                raise DatasetError(f"{path}: counts.{category}.{split} must hold 'normal' and 'anomalous' counts")
            total += sum(_count(path, f"counts.{category}.{split}.{label}", labels.get(label))
                         for label in ("normal", "anomalous"))
    if _count(path, "total", manifest["total"]) != total:
        raise DatasetError(f"{path}: total is {manifest['total']} but the counts add up to {total}")
    if not isinstance(manifest["shards"], list):
        raise DatasetError(f"{path}: shards must be a list, got {type(manifest['shards']).__name__}")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or not all(k in shard for k in ("path", "category", "split", "rows")):
            raise DatasetError(f"{path}: shards[{i}] must have path, category, split and rows")
        relative = PurePosixPath(str(shard["path"]))
        if relative.is_absolute() or ".." in relative.parts:
            raise DatasetError(f"{path}: shards[{i}].path {shard['path']!r} leaves the dataset folder")
        if shard["category"] not in counts or shard["split"] not in SPLITS:
            raise DatasetError(f"{path}: shards[{i}] is in an unknown partition "
                               f"({shard['category']!r}, {shard['split']!r})")
        _count(path, f"shards[{i}].rows", shard["rows"])
    rows = {}
    for shard in manifest["shards"]:
        rows[shard["category"], shard["split"]] = rows.get((shard["category"], shard["split"]), 0) + shard["rows"]
    for category, per_split in counts.items():
        for split in SPLITS:
            counted = per_split[split]["normal"] + per_split[split]["anomalous"]
            if rows.get((category, split), 0) != counted:
                raise DatasetError(f"{path}: counts.{category}.{split} add up to {counted} images but its "
                                   f"shards hold {rows.get((category, split), 0)} rows")


def summary(manifest: dict) -> dict:
    """The ``data inspect --json`` document: total and per-category counts (README, "Command line")."""
    categories = {
        name: {"train": {"normal": c["train"]["normal"]},
               "test": {"normal": c["test"]["normal"], "anomalous": c["test"]["anomalous"]}}
        for name, c in manifest["counts"].items()
    }
    return {"total": manifest["total"], "categories": categories}


def format_table(doc: dict) -> str:
    rows = [("category", "train", "test normal", "test anomalous")]
    for name, c in doc["categories"].items():
        rows.append((name, str(c["train"]["normal"]), str(c["test"]["normal"]), str(c["test"]["anomalous"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths,
             strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(doc['categories'])} categories, {doc['total']} images")
    return "\n".join(lines)


def verify(root: str | Path, manifest: dict | None = None) -> list[str]:
    """Check every shard's existence, sha256 and row count, and the manifest's counts against the
    labels the shards hold; returns the problems found (empty if none)."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    problems = []
    labels: dict[tuple[str, str], list[int]] = {}
    for shard in manifest["shards"]:
        path = root / shard["path"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_of(path) != shard.get("sha256"):
            problems.append(f"{path}: sha256 mismatch (corrupted or modified)")
        elif pq.ParquetFile(path).metadata.num_rows != shard["rows"]:
            problems.append(f"{path}: {pq.ParquetFile(path).metadata.num_rows} rows, manifest says {shard['rows']}")
        else:
            label = pq.read_table(path, columns=["label"], partitioning=None)["label"].to_pylist()
            labels.setdefault((shard["category"], shard["split"]), []).extend(label)
    if problems:
        return problems
    for category, per_split in manifest["counts"].items():
        for split in SPLITS:
            held = labels.get((category, split), [])
            found = {"normal": held.count(0), "anomalous": held.count(1)}
            if found != {k: per_split[split][k] for k in found}:
                problems.append(f"{manifest_path(root)}: counts.{category}.{split} is {per_split[split]} "
                                f"but the shards hold {found}")
    return problems


def shard_paths(root: str | Path, manifest: dict, split: str, categories: list[str] | None = None) -> list[str]:
    """Absolute paths of the shards of ``split`` (and of ``categories``, if given): the partition filter."""
    known = set(manifest["counts"])
    if categories is not None:
        unknown = sorted(set(categories) - known)
        if unknown:
            raise DatasetError(f"{Path(root) / MANIFEST_NAME}: unknown categories {unknown}")
    wanted = known if categories is None else set(categories)
    return [str(Path(root) / s["path"]) for s in manifest["shards"] if s["split"] == split and s["category"] in wanted]
