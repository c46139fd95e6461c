import io
import json
import os

import numpy as np
import pytest
from layouts import SIZE, folder_tree, mvtec_tree, realiad_tree, visa_tree, write_image, write_mask
from PIL import Image

from anomdiff.data.convert import LayoutError, convert
from anomdiff.data.images import BadSampleError, decode_mask, decode_rgb
from anomdiff.data.manifest import read_manifest, summary, verify
from anomdiff.data.schema import read_shard
from anomdiff.data.writer import OutputExistsError


def rows(out):
    return [r for s in read_manifest(out)["shards"] for r in read_shard(out / s["path"]).to_pylist()]


def snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_mvtec_layout_converts_with_counts_masks_and_rgb(tmp_path):
    src = mvtec_tree(tmp_path / "mvtec")
    before = snapshot(src)
    manifest = convert(src, tmp_path / "out", "mvtec", image_size=32, workers=1)
    assert summary(manifest)["categories"]["grid"] == {"train": {"normal": 3}, "test": {"normal": 2, "anomalous": 2}}
    assert manifest["total"] == 14 and manifest["image_size"] == 32
    table = rows(tmp_path / "out")
    grid_image = next(r for r in table if r["category"] == "grid")
    assert decode_rgb(grid_image["image"]).shape == (32, 32, 3)
    anomalous = [r for r in table if r["label"] == 1]
    assert all(r["defect_type"] == "crack" and r["mask"] is not None for r in anomalous)
    assert all(r["mask"] is None for r in table if r["label"] == 0)
    mask = np.asarray(Image.open(io.BytesIO(anomalous[0]["mask"])))
    assert set(np.unique(mask)) == {0, 255}
    assert snapshot(src) == before, "the converter must never touch the source"
    assert verify(tmp_path / "out") == []


def test_visa_masks_holding_class_ids_are_binarised(tmp_path):
    convert(visa_tree(tmp_path / "visa"), tmp_path / "out", "visa", image_size=SIZE, workers=1)
    anomalous = [r for r in rows(tmp_path / "out") if r["label"] == 1]
    assert len(anomalous) == 4
    for r in anomalous:
        mask = decode_mask(r["mask"], SIZE, SIZE)
        assert mask.sum() == (SIZE // 4) ** 2


def test_realiad_keeps_camera_view_and_ok_is_normal(tmp_path):
    manifest = convert(realiad_tree(tmp_path / "realiad"), tmp_path / "out", "realiad", image_size=32, workers=1)
    assert summary(manifest)["categories"]["toy"] == {"train": {"normal": 3}, "test": {"normal": 1, "anomalous": 2}}
    table = rows(tmp_path / "out")
    assert {r["view"] for r in table} == {1, 2, 3}
    assert {r["defect_type"] for r in table if r["label"]} == {"AK"}


def test_realiad_json_dir_picks_another_split_set(tmp_path):
    src = realiad_tree(tmp_path / "realiad")
    single = src / "realiad_jsons_sv"
    single.mkdir()
    meta = json.loads((src / "realiad_jsons" / "realiad_jsons" / "toy.json").read_text())
    meta["train"] = meta["train"][:1]
    (single / "toy.json").write_text(json.dumps(meta))
    manifest = convert(src, tmp_path / "out", "realiad", image_size=32, workers=1, json_dir="realiad_jsons_sv")
    assert list(manifest["counts"]) == ["toy"] and manifest["counts"]["toy"]["train"]["normal"] == 1


def test_folder_layout_splits_normals_stably(tmp_path):
    src = folder_tree(tmp_path / "folder", good=30)
    first = convert(src, tmp_path / "a", "folder", image_size=32, workers=1)
    second = convert(src, tmp_path / "b", "folder", image_size=32, workers=2)
    counts = first["counts"]["widget"]
    assert counts == second["counts"]["widget"]
    assert counts["train"]["normal"] + counts["test"]["normal"] == 30 and counts["test"]["anomalous"] == 2
    assert 0 < counts["test"]["normal"] < 15
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]


def test_truncated_image_is_named_in_the_error(tmp_path):
    src = mvtec_tree(tmp_path / "mvtec", categories=("bottle",))
    bad = src / "bottle" / "train" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(BadSampleError, match="001.png.*truncated"):
        convert(src, tmp_path / "out", "mvtec", workers=1)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no half-written output is left"


def test_anomalous_sample_without_mask_is_named(tmp_path):
    src = mvtec_tree(tmp_path / "mvtec", categories=("bottle",))
    os.remove(src / "bottle" / "ground_truth" / "crack" / "001_mask.png")
    with pytest.raises(BadSampleError, match=r"001.png: anomalous sample without a mask"):
        convert(src, tmp_path / "out", "mvtec", workers=2)


def test_mask_of_another_size_is_named(tmp_path):
    src = mvtec_tree(tmp_path / "mvtec", categories=("bottle",))
    write_mask(src / "bottle" / "ground_truth" / "crack" / "000_mask.png", size=SIZE + 8)
    with pytest.raises(BadSampleError, match=r"000_mask.png: mask is 48x48 but its image 000.png is 40x40"):
        convert(src, tmp_path / "out", "mvtec", workers=1)


def test_category_without_training_images_is_named(tmp_path):
    src = mvtec_tree(tmp_path / "mvtec", categories=("bottle", "cable"))
    for p in (src / "cable" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(BadSampleError, match="category cable: has no training images"):
        convert(src, tmp_path / "out", "mvtec", workers=1)


def test_unknown_layout_is_refused(tmp_path):
    write_image(tmp_path / "src" / "random.png", 0)
    for fmt in ("mvtec", "visa", "realiad", "folder"):
        with pytest.raises(LayoutError, match="src"):
            convert(tmp_path / "src", tmp_path / "out", fmt)
    with pytest.raises(LayoutError, match="unknown format"):
        convert(tmp_path / "src", tmp_path / "out", "coco")


def test_skip_bad_lists_every_rejected_sample_with_its_reason(tmp_path):
    src = mvtec_tree(tmp_path / "mvtec", categories=("bottle", "cable"))
    (src / "bottle" / "train" / "good" / "000.png").write_bytes(b"not a png")
    os.remove(src / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    for p in (src / "cable" / "train" / "good").iterdir():
        p.unlink()
    manifest = convert(src, tmp_path / "out", "mvtec", skip_bad=True, workers=1)
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    reasons = {r["sample_id"]: r["reason"] for r in rejected}
    assert "unreadable" in reasons["bottle/train/good/000"]
    assert "without a mask" in reasons["bottle/test/crack/000"]
    assert sum("cable has no training images" in r for r in reasons.values()) == 4
    assert manifest["rejected"] == 6 and list(manifest["counts"]) == ["bottle"]
    assert manifest["total"] == 7 - 2


def test_output_inside_the_source_is_refused(tmp_path):
    src = mvtec_tree(tmp_path / "mvtec", categories=("bottle",))
    with pytest.raises(OutputExistsError, match="inside the source folder"):
        convert(src, src / "converted", "mvtec")


def test_category_names_as_users_write_them_convert_and_read_back_as_written(tmp_path):
    import duckdb
    import pandas as pd

    names = ("pièce 1", "零件", "Ölwanne-2")
    src = mvtec_tree(tmp_path / "src", categories=names)
    convert(src, tmp_path / "out", "mvtec", image_size=16, workers=1)
    folders = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert "category=pi%C3%A8ce%201" in folders  # hive URI segment encoding
    assert sorted(read_manifest(tmp_path / "out")["counts"]) == sorted(names)
    assert set(pd.read_parquet(tmp_path / "out")["category"]) == set(names)
    found = duckdb.sql(f"select distinct category from read_parquet('{tmp_path / 'out'}/**/*.parquet', "
                       "hive_partitioning=true)").fetchall()
    assert {row[0] for row in found} == set(names)
    shard = next((tmp_path / "out").rglob("*.parquet"))
    assert set(read_shard(shard, columns=["category"]).column("category").to_pylist()) <= set(names)
