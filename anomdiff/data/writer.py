"""Sharded, hive-partitioned parquet writer with a checksummed manifest, written atomically.

Rows go to ``<staging>/category=<c>/split=<s>/part-<k>.parquet``; a partition's buffer becomes a
shard once it holds ``shard_mb`` of encoded images. ``close()`` writes ``_manifest.json`` and only
then renames the staging folder onto the destination (``anomdiff.atomic``), so a failed run leaves
nothing half-written and a killed one leaves a temporary the next run removes. An existing folder
is replaced only with ``overwrite=True``, only if it holds a dataset, never if it is or holds one of
the ``sources`` being read, and only after the new dataset is complete.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from anomdiff.atomic import replace_directory, staging_directory, write_json_atomic
from anomdiff.data.schema import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SPLITS,
    Record,
    category_problem,
    manifest_path,
    partition_dir,
    records_to_table,
)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class OutputExistsError(FileExistsError):
    pass


def check_output(out: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse an output folder that would lose data: one that is, holds or lies inside a source being
    read, or an existing one without ``overwrite`` or that is not a dataset (no manifest)."""
    target = out.resolve()
    for source in sources:
        source = Path(source).resolve()
        if target == source or source.is_relative_to(target):
            raise OutputExistsError(f"{out} is the source folder {source} or holds it; write the dataset elsewhere")
        if target.is_relative_to(source):
            raise OutputExistsError(f"{out} is inside the source folder {source}, which is only ever read; "
                                    "write the dataset elsewhere")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
        if not out.is_dir() or manifest_path(out) is None:
            raise OutputExistsError(f"{out} is not an anomdiff dataset (no {MANIFEST_NAME}); --overwrite replaces "
                                    "only a dataset folder")


class DatasetWriter:
    """Collects :class:`Record` rows and writes the dataset; use as a context manager."""

    def __init__(self, out: str | Path, image_size: int, shard_mb: float = 128, overwrite: bool = False,
                 extra: dict | None = None, sources: tuple[Path, ...] = ()):
        self.out = Path(out)
        check_output(self.out, overwrite, sources)
        if not 0 < shard_mb < float("inf"):
            raise ValueError(f"shard size must be a positive number of MB, got {shard_mb}")
        self.image_size = image_size
        self.shard_bytes = int(shard_mb * 1024 * 1024)
        self.extra = extra or {}
        self.tmp = staging_directory(self.out)
        self._buffers: dict[tuple[str, str], list[Record]] = defaultdict(list)
        self._buffered_bytes: dict[tuple[str, str], int] = defaultdict(int)
        self._next_part: dict[tuple[str, str], int] = defaultdict(int)
        self._counts: dict[str, dict[str, dict[str, int]]] = {}
        self._shards: list[dict] = []
        self._ids: set[str] = set()
        self.manifest: dict | None = None

    def add(self, record: Record) -> None:
        problem = category_problem(record.category)
        if problem:
            raise ValueError(f"{record.source}: category name {record.category!r} {problem}")
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
        try:
            pq.write_table(records_to_table(records), path, row_group_size=256, compression="zstd")
        except OSError as exc:
            if exc.errno is None or exc.filename:
                raise
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.out / relative)) from exc  # name the file
        self._shards.append(
            {"path": relative, "category": key[0], "split": key[1], "rows": len(records),
             "bytes": path.stat().st_size, "sha256": sha256_of(path)}
        )

    def close(self) -> dict:
        """Flush every partition, write the manifest, and move the dataset into place."""
        untrained = sorted(c for c, counts in self._counts.items() if not counts["train"]["normal"])
        if untrained:
            raise ValueError(f"{self.out}: category {untrained[0]} would have no training images"
                             + (f" (nor would {', '.join(untrained[1:])})" if len(untrained) > 1 else ""))
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
        replace_directory(self.tmp, self.out)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
