"""Reading, summarising and verifying a converted dataset's ``manifest.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from anomdiff.data.schema import MANIFEST_NAME, SCHEMA_VERSION
from anomdiff.data.writer import sha256_of


class DatasetError(ValueError):
    """A dataset folder that is missing, malformed or corrupted; the message names the file."""


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(f"{path}: no manifest; is {root} a dataset written by `anomdiff data convert/synth`?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("schema_version", "image_size", "counts", "shards"):
        if key not in manifest:
            raise DatasetError(f"{path}: missing key {key!r}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: schema version {manifest['schema_version']}, this anomdiff reads {SCHEMA_VERSION}"
        )
    return manifest


def summary(manifest: dict) -> dict:
    """The ``data inspect --json`` document: total and per-category counts (DESIGN.md)."""
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
    """Check every shard's existence, sha256 and row count; returns the problems found (empty if none)."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    problems = []
    for shard in manifest["shards"]:
        path = root / shard["path"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_of(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 mismatch (corrupted or modified)")
        elif pq.ParquetFile(path).metadata.num_rows != shard["rows"]:
            problems.append(f"{path}: {pq.ParquetFile(path).metadata.num_rows} rows, manifest says {shard['rows']}")
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
