import numpy as np
import pytest

from anomdiff.data.images import decode_mask
from anomdiff.data.manifest import read_manifest, summary, verify
from anomdiff.data.schema import read_shard
from anomdiff.data.synthetic import (
    ANOMALY_KINDS,
    FAMILIES,
    category_samples,
    category_specs,
    paste_anomaly,
    render_normal,
    synthesize,
)


def test_two_hundred_categories_are_distinct_and_cover_every_family():
    specs = category_specs(200, seed=3)
    assert len({s.name for s in specs}) == 200
    assert {s.family for s in specs} == set(FAMILIES)
    looks = {(s.family, s.colors, tuple(sorted(s.params.items()))) for s in specs}
    assert len(looks) == 200


def test_generation_is_deterministic_from_the_seed():
    specs = category_specs(4, seed=11)
    first = list(category_samples(specs, 2, 11, 48, 3, 4))
    again = list(category_samples(category_specs(4, seed=11), 2, 11, 48, 3, 4))
    other = list(category_samples(category_specs(4, seed=12), 2, 12, 48, 3, 4))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0].image, other[0].image)


def test_normal_images_of_a_category_vary_but_stay_alike():
    spec = category_specs(7, seed=0)[6]  # an object family
    images = [render_normal(spec, np.random.default_rng(i), 64).astype(float) for i in range(4)]
    assert all(np.abs(images[0] - im).mean() > 0.5 for im in images[1:]), "normal images should not be copies"
    other = render_normal(category_specs(8, seed=0)[7], np.random.default_rng(0), 64).astype(float)
    assert np.abs(images[0] - images[1]).mean() < np.abs(images[0] - other).mean()


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_each_anomaly_kind_changes_exactly_the_masked_pixels(kind):
    spec = category_specs(3, seed=0)[1]
    for seed in range(5):
        rng = np.random.default_rng(seed)
        clean = render_normal(spec, rng, 96)
        defective, mask = paste_anomaly(clean, rng, kind=kind)
        assert mask.dtype == bool and mask.sum() >= 4
        assert np.array_equal(defective[~mask], clean[~mask]), "pixels outside the mask must be untouched"
        assert np.abs(defective[mask].astype(int) - clean[mask]).mean() > 10, "the defect must be visible"


def test_defect_sizes_range_from_tiny_to_about_a_tenth_of_the_image():
    spec = category_specs(1, seed=0)[0]
    areas = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        _, mask = paste_anomaly(render_normal(spec, rng, 128), rng, kind="stain")
        areas.append(mask.mean())
    assert min(areas) < 0.005 and 0.05 < max(areas) < 0.16


def test_dataset_mask_is_non_empty_exactly_when_label_is_one(tmp_path):
    manifest = synthesize(tmp_path / "synth", 12, seed=5, image_size=32, train_per_category=4,
                          test_per_category=6, workers=2)
    assert summary(manifest)["total"] == 12 * 10
    assert all(c["test"] == {"normal": 3, "anomalous": 3} for c in summary(manifest)["categories"].values())
    for shard in manifest["shards"]:
        for row in read_shard(tmp_path / "synth" / shard["path"]).to_pylist():
            mask = decode_mask(row["mask"], 32, 32)
            assert (mask.sum() > 0) == (row["label"] == 1), row["sample_id"]
            assert (row["defect_type"] == "good") == (row["label"] == 0)
    assert verify(tmp_path / "synth") == []


def test_synthesize_output_does_not_depend_on_worker_count(tmp_path):
    one = synthesize(tmp_path / "a", 3, seed=1, image_size=24, train_per_category=2, test_per_category=2, workers=1)
    two = synthesize(tmp_path / "b", 3, seed=1, image_size=24, train_per_category=2, test_per_category=2, workers=2)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert read_manifest(tmp_path / "a")["counts"] == read_manifest(tmp_path / "b")["counts"]
