"""The Arrow schema of a converted dataset and the layout of its folder (README, "Data").

A dataset is hive-partitioned parquet, ``DATA/category=<name>/split=<train|test>/part-<k>.parquet``,
plus ``DATA/_manifest.json`` (a name parquet readers skip; datasets written before are read from
``manifest.json``). As in every hive-partitioned dataset, ``category`` and ``split`` live in the folder
names only, so pyarrow, pandas and DuckDB read the folder as it is and agree on their type; each shard's
key-value metadata also names them, so a shard read alone still knows what it holds. Version 1
datasets, whose shards also held the two as columns, are still read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
PARTITION_COLUMNS = ("category", "split")
MANIFEST_NAME = "_manifest.json"
LEGACY_MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
SPLITS = ("train", "test")
NORMAL_DEFECT = "good"

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("defect_type", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=True),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("view", pa.int8(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
    ]
)
# What a shard file stores: everything but the partition columns.
SHARD_SCHEMA = pa.schema([f for f in SCHEMA if f.name not in PARTITION_COLUMNS])


@dataclass(frozen=True)
class Record:
    """One row of the dataset, images already encoded (PNG bytes)."""

    sample_id: str
    category: str
    split: str
    label: int
    defect_type: str
    image: bytes
    mask: bytes | None
    height: int
    width: int
    source: str
    view: int | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"{self.sample_id}: split must be one of {SPLITS}, got {self.split!r}")
        if self.label not in (0, 1):
            raise ValueError(f"{self.sample_id}: label must be 0 or 1, got {self.label!r}")
        if self.split == "train" and self.label != 0:
            raise ValueError(f"{self.sample_id}: the train split holds normal images only")
        if (self.mask is not None) != (self.label == 1):
            raise ValueError(f"{self.sample_id}: a mask is required for anomalous and forbidden for normal rows")

    @property
    def nbytes(self) -> int:
        return len(self.image) + (len(self.mask) if self.mask is not None else 0) + 64


def category_problem(name: str) -> str | None:
    """Why ``name`` cannot be a category, or ``None``: any printable name (spaces, accents, any script)
    is one; an empty name, ``.``/``..``, a path separator or a control character is not."""
    if not name or not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "is . or .., which cannot name a folder"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if not name.isprintable():
        return "holds a control character"
    return None


def partition_dir(category: str, split: str) -> str:
    """The hive partition folder of one category and split, relative to the dataset root. The name is
    URI-encoded (``pièce 1`` -> ``category=pi%C3%A8ce%201``), the hive convention that pyarrow, pandas,
    DuckDB and Ray Data decode when they read the folder."""
    return f"category={quote(category, safe='')}/split={split}"


def records_to_table(records: list[Record]) -> pa.Table:
    """The shard of one partition: ``SHARD_SCHEMA`` rows, category and split in the metadata."""
    (category, split), = {(r.category, r.split) for r in records}
    columns = {field.name: [getattr(r, field.name) for r in records] for field in SHARD_SCHEMA}
    schema = SHARD_SCHEMA.with_metadata({b"anomdiff.category": category.encode(), b"anomdiff.split": split.encode()})
    return pa.Table.from_pydict(columns, schema=schema)


def read_shard(path: str | Path, columns: list[str] | tuple[str, ...] | None = None) -> pa.Table:
    """One shard as ``SCHEMA`` rows (or ``columns`` of them): the partition columns, as strings, from its
    folder names (``.../category=C/split=S/part-k.parquet``) when the file does not hold them."""
    path = Path(path)
    partition = {key: unquote(value) for key, value in (folder.name.split("=", 1) for folder in
                                                          (path.parent.parent, path.parent) if "=" in folder.name)}
    missing = [c for c in PARTITION_COLUMNS if c not in partition]
    if missing:
        raise ValueError(f"{path}: not inside a category=<name>/split=<split> folder")
    wanted = list(columns) if columns is not None else SCHEMA.names
    stored = pq.read_schema(path).names
    table = pq.read_table(path, columns=[c for c in wanted if c in stored], partitioning=None)
    for name in wanted:
        if name not in stored:
            if name not in PARTITION_COLUMNS:
                raise ValueError(f"{path}: no column {name!r}")
            table = table.append_column(pa.field(name, pa.string(), nullable=False),
                                        pa.array([partition[name]] * table.num_rows, pa.string()))
    return table.select(wanted)


def manifest_path(root: str | Path) -> Path | None:
    """The manifest of the dataset folder ``root`` (the current name first, then the older one), or
    ``None`` when it has neither: then ``root`` is not a dataset."""
    for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME):
        if (Path(root) / name).is_file():
            return Path(root) / name
    return None
