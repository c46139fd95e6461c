import json

import pytest

from anomdiff.data.manifest import DatasetError, read_manifest, shard_paths, verify
from anomdiff.data.schema import Record
from anomdiff.data.writer import DatasetWriter, OutputExistsError


def record(i, category="cat", split="train", label=0, payload=2000):
    return Record(f"{category}/{split}/{i}", category, split, label, "good" if not label else "scratch",
                  bytes([i % 256]) * payload, b"m" if label else None, 8, 8, f"src/{i}")


def test_shards_are_bounded_by_size_and_counted_in_the_manifest(tmp_path):
    with DatasetWriter(tmp_path / "d", image_size=8, shard_mb=0.01) as writer:  # ~10 KB shards
        for i in range(20):
            writer.add(record(i))
        for i in range(3):
            writer.add(record(100 + i, split="test", label=1))
    manifest = read_manifest(tmp_path / "d")
    train_shards = [s for s in manifest["shards"] if s["split"] == "train"]
    assert len(train_shards) == 4 and sum(s["rows"] for s in train_shards) == 20
    assert manifest["counts"]["cat"] == {"train": {"normal": 20, "anomalous": 0},
                                         "test": {"normal": 0, "anomalous": 3}}
    assert all(s["path"].startswith("category=cat/split=") for s in manifest["shards"])
    assert len(shard_paths(tmp_path / "d", manifest, "test")) == 1


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    with DatasetWriter(tmp_path / "d", 8) as writer:
        writer.add(record(0))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        DatasetWriter(tmp_path / "d", 8)
    with DatasetWriter(tmp_path / "d", 8, overwrite=True) as writer:
        writer.add(record(1))
        writer.add(record(2))
    assert read_manifest(tmp_path / "d")["total"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_failed_write_leaves_the_previous_dataset_intact(tmp_path):
    with DatasetWriter(tmp_path / "d", 8) as writer:
        writer.add(record(0))
    with pytest.raises(RuntimeError), DatasetWriter(tmp_path / "d", 8, overwrite=True) as writer:
        writer.add(record(5))
        raise RuntimeError("conversion failed midway")
    assert read_manifest(tmp_path / "d")["total"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_bad_rows_are_named(tmp_path):
    writer = DatasetWriter(tmp_path / "d", 8)
    writer.add(record(0))
    with pytest.raises(ValueError, match="duplicate sample_id 'cat/train/0'"):
        writer.add(record(0))
    for name, why in (("a/b", "holds a path separator"), ("..", "cannot name a folder"), ("", "is empty"),
                      ("tab\there", "control character")):
        with pytest.raises(ValueError, match=why):
            writer.add(record(1, category=name))
    with pytest.raises(ValueError, match="train split holds normal images only"):
        record(2, label=1)
    writer.abort()


def test_verify_reports_a_corrupted_shard(tmp_path):
    with DatasetWriter(tmp_path / "d", 8) as writer:
        writer.add(record(0))
    manifest = read_manifest(tmp_path / "d")
    shard = tmp_path / "d" / manifest["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    assert verify(tmp_path / "d") == [f"{shard}: sha256 mismatch (corrupted or modified)"]


def test_unreadable_manifest_names_the_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text("{")
    with pytest.raises(DatasetError, match=r"d/manifest.json: not valid JSON"):
        read_manifest(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DatasetError, match="missing key 'image_size'"):
        read_manifest(tmp_path / "d")


def test_other_tools_read_a_dataset_folder_as_it_is(tmp_path):
    """The folder is a plain hive-partitioned parquet dataset: category and split come from the folder
    names (as strings), the manifest is skipped, pandas can filter on the partition."""
    import pandas as pd
    import pyarrow.dataset as ds

    with DatasetWriter(tmp_path / "d", image_size=8) as writer:
        for i in range(3):
            writer.add(record(i, category="bottle"))
            writer.add(record(10 + i, category="grid"))
        writer.add(record(20, category="grid", split="test", label=1))
    table = ds.dataset(tmp_path / "d", partitioning="hive").to_table()
    assert table.num_rows == 7 and table.schema.field("category").type == "string"
    assert sorted(table.group_by(["category", "split"]).aggregate([([], "count_all")]).to_pylist(),
                  key=str) == sorted([{"category": "bottle", "split": "train", "count_all": 3},
                                      {"category": "grid", "split": "train", "count_all": 3},
                                      {"category": "grid", "split": "test", "count_all": 1}], key=str)
    grid = pd.read_parquet(tmp_path / "d", filters=[("category", "=", "grid")])
    assert len(grid) == 4 and set(grid["category"].astype(str)) == {"grid"}
    assert grid.loc[grid["split"] == "test", "label"].tolist() == [1]
    import duckdb

    counted = duckdb.sql(f"select category, split, count(*) from read_parquet('{tmp_path / 'd'}/**/*.parquet', "
                         "hive_partitioning=true) group by all order by all").fetchall()
    assert counted == [("bottle", "train", 3), ("grid", "test", 1), ("grid", "train", 3)]


def test_numeric_category_names_stay_strings_with_a_string_partition_schema(tmp_path):
    """Readers infer ``01`` as the integer 1 unless told the partition's type (README, "Data")."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds

    with DatasetWriter(tmp_path / "d", image_size=8) as writer:
        for category in ("01", "02"):
            writer.add(record(0, category=category))
    strings = ds.partitioning(pa.schema([("category", pa.string()), ("split", pa.string())]), flavor="hive")
    assert sorted(ds.dataset(tmp_path / "d", partitioning=strings).to_table()["category"].to_pylist()) == ["01", "02"]
    one = pd.read_parquet(tmp_path / "d", partitioning=strings, filters=[("category", "=", "01")])
    assert one["category"].tolist() == ["01"]


def test_a_shard_read_alone_knows_its_partition_and_old_shards_still_read(tmp_path):
    import pyarrow.parquet as pq

    from anomdiff.data.schema import SCHEMA, read_shard

    with DatasetWriter(tmp_path / "d", image_size=8) as writer:
        writer.add(record(0, category="01"))
        writer.add(record(1, category="01", split="test", label=1))
    (shard,) = shard_paths(tmp_path / "d", read_manifest(tmp_path / "d"), "test")
    assert "category" not in pq.read_schema(shard).names  # hive convention: the folder names hold it
    assert pq.read_schema(shard).metadata[b"anomdiff.category"] == b"01"
    row = read_shard(shard).to_pylist()[0]
    assert (row["category"], row["split"], row["label"]) == ("01", "test", 1)
    assert read_shard(shard, ["label", "category"]).column_names == ["label", "category"]
    # schema version 1 stored category and split in the shard too
    old = tmp_path / "old" / "category=x" / "split=train" / "part-00000.parquet"
    old.parent.mkdir(parents=True)
    pq.write_table(read_shard(shard).cast(SCHEMA), old)
    assert read_shard(old, ["category", "split"]).to_pylist() == [{"category": "01", "split": "test"}]
    loose = tmp_path / "loose.parquet"
    pq.write_table(pq.read_table(shard), loose)
    with pytest.raises(ValueError, match="loose.parquet: not inside a category=<name>/split=<split> folder"):
        read_shard(loose)
