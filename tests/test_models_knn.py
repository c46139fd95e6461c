"""The PatchCore-style floor: coreset selection, nearest-neighbour search, the bank and its scores."""

import pytest
import torch
from samples import images

from anomdiff.models import build_model, load_model
from anomdiff.models.config import ModelConfig, load_preset
from anomdiff.models.knn import CategoryReservoir, greedy_coreset, nearest_distance

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_knn(overrides=None, num_categories=2):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"method": "knn", **(overrides or {})}, base=load_preset("tiny"))
    return build_model(cfg, num_categories)


def test_greedy_coreset_takes_one_point_from_every_cluster_first():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    chosen = greedy_coreset(points, 4, projection_dim=128, seed=3)
    assert sorted(int(i) // 50 for i in chosen) == [0, 1, 2, 3]
    assert torch.equal(chosen, greedy_coreset(points, 4, seed=3))  # seeded
    assert torch.equal(greedy_coreset(points, 500), torch.arange(200))  # asking for more keeps all


def test_nearest_distance_is_the_brute_force_minimum_whatever_the_chunk():
    torch.manual_seed(0)
    queries, bank = torch.randn(37, 8), torch.randn(101, 8)
    expected = torch.cdist(queries, bank).amin(dim=1)
    for chunk in (1, 7, 1000):
        assert torch.allclose(nearest_distance(queries, bank, chunk), expected)
    with pytest.raises(ValueError, match="memory bank is empty"):
        nearest_distance(queries, bank[:0])


def test_the_bank_is_a_bounded_coreset_per_category():
    model = tiny_knn({"knn": {"coreset_ratio": 0.5, "max_per_category": 40}})
    features = {0: torch.randn(60, model.dim), 1: torch.randn(200, model.dim)}
    model.build_memory(features)
    assert model.memory_category.tolist() == [0] * 30 + [1] * 40  # half of 60; 200 capped at 40
    assert model.parameter_counts()["memory"] == 2 * 40 * model.dim and model.trainable_parameters() == []


def test_a_reservoir_stays_bounded_and_counts_every_row_it_saw():
    model = tiny_knn({"knn": {"max_per_category": 10}})
    reservoir = CategoryReservoir(model)
    rows = [torch.randn(9, model.dim) for _ in range(7)]
    for part in rows:
        reservoir.add(part)
        assert len(reservoir.rows()) <= 2 * 10
    assert reservoir.count == 63
    seen = torch.cat(rows)
    assert all((seen == row).all(dim=1).any() for row in reservoir.rows())  # kept rows are real rows


def test_the_category_aware_option_is_refused_for_a_method_that_never_reads_it():
    with pytest.raises(ValueError, match="never reads a category"):
        tiny_knn({"conditioning": "category_aware"})


def test_patch_features_are_locally_aggregated_on_the_finest_grid():
    model = tiny_knn()
    x, _ = images(0, 2, seed=0)
    features = model.patch_features(x)
    assert features.shape == (2, model.dim, 16, 16)  # layers 1-2 of resnet18: strides 4 and 8
    assert model.dim == 64 + 128


@pytest.fixture(scope="module")
def fitted():
    """A bank built from 12 normals of each of two categories, as the training job builds it."""
    model = tiny_knn()
    bank = {}
    for category in (0, 1):
        x, _ = images(category, 12, seed=category)
        f = model.patch_features(x)
        bank[category] = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    model.build_memory(bank)
    return model.eval()


def test_defects_score_higher_than_normals_and_their_pixels_are_hotter(fitted):
    normal, _ = images(1, 6, seed=100)
    defective, masks = images(1, 6, seed=200, defects=True)
    ok, bad = fitted.score({"image": normal}), fitted.score({"image": defective})
    assert bad["image_score"].min() > ok["image_score"].median()
    inside = (bad["anomaly_map"] * masks).sum() / masks.sum()
    outside = (bad["anomaly_map"] * (1 - masks)).sum() / (1 - masks).sum()
    assert inside > 1.5 * outside


def test_scores_never_read_the_category_and_survive_save_and_load(fitted, tmp_path):
    x, _ = images(0, 3, seed=7)
    expected = fitted.score({"image": x})
    told = fitted.score({"image": x, "category_index": torch.tensor([1, 1, 1])})
    assert torch.equal(expected["anomaly_map"], told["anomaly_map"])
    fitted.save(tmp_path / "knn", metadata={"categories": ["a", "b"]})
    loaded = load_model(tmp_path / "knn")
    assert loaded.metadata == {"categories": ["a", "b"]} and torch.equal(loaded.memory, fitted.memory)
    assert torch.equal(loaded.score({"image": x})["anomaly_map"], expected["anomaly_map"])
