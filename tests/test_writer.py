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
    with pytest.raises(ValueError, match="not a valid folder name"):
        writer.add(record(1, category="a/b"))
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
