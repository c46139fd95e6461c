import numpy as np
import pytest

from anomdiff.config import DataConfig
from anomdiff.data.synthetic import synthesize

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "synth"
    synthesize(out, 6, seed=2, image_size=32, train_per_category=10, test_per_category=4, workers=1)
    return out


def test_ray_data_round_trip_decodes_every_row_of_the_chosen_categories(local_ray, dataset):
    from pipelines.data import DataSpec, test_dataset, train_dataset, training_normals, validation_dataset

    spec = DataSpec.open(DataConfig(path=str(dataset), num_categories=4, validation_fraction=0.2), 16, batch_size=8)
    categories = spec.categories
    assert len(categories) == 4
    train = train_dataset(spec).take_all()
    validation = validation_dataset(spec).take_all()
    train_ids = {r["sample_id"] for r in training_normals(spec, validation=False).take_all()}
    assert len(train) == len(train_ids)
    validation_ids = {r["sample_id"] for r in training_normals(spec, validation=True).take_all()}
    assert len(validation) == len(validation_ids) and "sample_id" not in validation[0]
    assert len(train_ids) + len(validation_ids) == 40 and not train_ids & validation_ids
    assert 0 < len(validation_ids) < 20
    assert {sid.split("/")[0] for sid in train_ids} == set(categories)
    assert {categories[r["category_index"]] for r in train} == set(categories)

    row = train[0]  # training streams carry uint8 pixels and only what a training step reads
    assert set(row) == {"image", "category_index"}
    assert row["image"].shape == (3, 16, 16) and row["image"].dtype == np.uint8 and row["image"].max() > 0
    held_out = validation[0]
    assert held_out["image"].shape == (3, 16, 16) and held_out["image"].dtype == np.float32
    assert -1.0 <= held_out["image"].min() and held_out["image"].max() <= 1.0
    assert held_out["mask"].shape == (1, 16, 16) and held_out["mask"].sum() == 0

    test = test_dataset(spec).take_all()
    assert len(test) == 16
    for r in test:
        assert (r["mask"].sum() > 0) == (r["label"] == 1)
        assert categories[r["category_index"]] == r["sample_id"].split("/")[0]


def test_streaming_into_torch_batches(local_ray, dataset):
    from pipelines.data import DataSpec, train_dataset

    spec = DataSpec.open(DataConfig(path=str(dataset), num_categories=2, validation_fraction=0.0), 16, batch_size=4)
    seen = 0
    for batch in train_dataset(spec).iter_torch_batches(batch_size=5, local_shuffle_buffer_size=10):
        assert batch["image"].shape[1:] == (3, 16, 16)
        seen += len(batch["image"])
    assert seen == 20


def test_cached_training_rows_are_the_streamed_ones(local_ray, dataset):
    from ray.data.dataset import MaterializedDataset

    from pipelines.data import DataSpec, train_dataset

    config = DataConfig(path=str(dataset), num_categories=2, validation_fraction=0.2)
    spec = DataSpec.open(config, 16, batch_size=4)
    cached_spec = DataSpec.open(DataConfig(**{**config.to_dict(), "cache": True}), 16, batch_size=4)
    cached = train_dataset(cached_spec)
    assert isinstance(cached, MaterializedDataset)

    def sums(data):
        return sorted(float(row["image"].sum()) for row in data.take_all())

    assert sums(cached) == sums(train_dataset(spec))
    assert spec.decoded_train_bytes() == 2 * 10 * 3 * 16 * 16  # upper bound: before the 20% hold-out


def test_balancing_repeats_each_category_up_to_the_largest():
    from pipelines.data import balancing_repeats

    assert balancing_repeats({"a": 100, "b": 60, "c": 30}) == {"a": 1, "b": 2, "c": 3}


def test_unknown_category_subset_is_refused(dataset):
    from pipelines.data import DataSpec

    with pytest.raises(ValueError, match="asked for 7 categories, the dataset has 6"):
        DataSpec.open(DataConfig(path=str(dataset), num_categories=7), 16)


def test_validation_is_drawn_per_category_and_is_the_same_set_each_time(local_ray, dataset):
    """A limit below the category count still sees every category (one normal each), and two reads
    (two checkpoints) score the same images; ``.limit`` over shard order took the first categories only."""
    from pipelines.data import DataSpec, validation_dataset, validation_ids

    spec = DataSpec.open(DataConfig(path=str(dataset), validation_fraction=0.5), 16, batch_size=8)
    chosen = validation_ids(spec, limit=4)
    assert set(chosen) == set(spec.categories) and all(len(ids) == 1 for ids in chosen.values())
    assert validation_ids(spec, limit=4) == chosen
    for _ in range(2):
        rows = validation_dataset(spec, limit=4).take_all()
        assert sorted(spec.categories[r["category_index"]] for r in rows) == sorted(spec.categories)
    more = validation_ids(spec, limit=12)
    assert all(len(ids) == 2 and set(chosen[c]) <= set(ids) for c, ids in more.items())  # nested, 12/6 each
