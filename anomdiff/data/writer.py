"""Sharded, hive-partitioned parquet writer with a checksummed manifest, written atomically.

Rows go to ``<tmp>/category=<c>/split=<s>/part-<k>.parquet``; a partition's buffer becomes a
shard once it holds ``shard_mb`` of encoded images. ``close()`` writes ``manifest.json`` and only
then renames the temporary folder onto the destination, so a failed run leaves nothing
half-written, and an existing dataset is replaced only with ``overwrite=True`` and only after the
new one is complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from anomdiff.atomic import write_json_atomic
from anomdiff.data.schema import MANIFEST_NAME, SCHEMA_VERSION, SPLITS, Record, partition_dir, records_to_table

_CATEGORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class OutputExistsError(FileExistsError):
    pass


class DatasetWriter:
    """Collects :class:`Record` rows and writes the dataset; use as a context manager."""

    def __init__(self, out: str | Path, image_size: int, shard_mb: float = 128, overwrite: bool = False,
                 extra: dict | None = None):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise OutputExistsError(f"{self.out} already exists; pass --overwrite to replace it")
        if shard_mb <= 0:
            raise ValueError(f"shard size must be positive, got {shard_mb} MB")
        self.image_size = image_size
        self.shard_bytes = int(shard_mb * 1024 * 1024)
        self.extra = extra or {}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        self._buffers: dict[tuple[str, str], list[Record]] = defaultdict(list)
        self._buffered_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self._next_part: dict[tuple[str, str], int] = defaultdict(int)
        self._counts: dict[str, dict[str, dict[str, int]]] = {}
        self._shards: list[dict] = []
        self._ids: set[str] = set()
        self.manifest: dict | None = None

    def add(self, record: Record) -> None:
        if not _CATEGORY_NAME.match(record.category):
            raise ValueError(f"{record.source}: category name {record.category!r} is not a valid folder name")
        if record.sample_id in self._ids:
            raise ValueError(f"{record.source}: duplicate sample_id {record.sample_id!r}")
        self._ids.add(record.sample_id)
        key = (record.category, record.split)
        self._buffers[key].append(record)
        self._buffered_bytes[key] += record.nbytes
        counts = self._counts.setdefault(record.category, {s: {"normal": 0, "anomalous": 0} for s in SPLITS})
        counts[record.split]["anomalous" if record.label else "normal"] += 1
        if self._buffered_bytes[key] >= self.shard_bytes:
            self._flush(key)

    def _flush(self, key: tuple[str, str]) -> None:
        records = self._buffers.pop(key, [])
        self._buffered_bytes.pop(key, None)
        if not records:
            return
        part = self._next_part[key]
        self._next_part[key] += 1
        relative = f"{partition_dir(*key)}/part-{part:05d}.parquet"
        path = self.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        # Images are already compressed: small row groups keep streaming reads fine-grained.
        pq.write_table(records_to_table(records), path, row_group_size=256, compression="zstd")
        self._shards.append(
            {"path": relative, "category": key[0], "split": key[1], "rows": len(records),
             "bytes": path.stat().st_size, "sha256": sha256_of(path)}
        )

    def close(self) -> dict:
        """Flush every partition, write the manifest, and move the dataset into place."""
        for key in list(self._buffers):
            self._flush(key)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "image_size": self.image_size,
            "total": sum(s["rows"] for s in self._shards),
            "counts": {c: self._counts[c] for c in sorted(self._counts)},
            "shards": sorted(self._shards, key=lambda s: s["path"]),
            **self.extra,
        }
        write_json_atomic(self.tmp / MANIFEST_NAME, manifest)
        self.manifest = manifest
        if self.out.exists():
            retired = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, retired)
            os.replace(self.tmp, self.out)
            shutil.rmtree(retired)
        else:
            os.replace(self.tmp, self.out)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
