"""PatchCore, the floor: coreset selection, nearest-neighbour search, the bank and its scores."""

import pytest
import torch
from samples import images
from sklearn.metrics import roc_auc_score

from anomdiff.models import build_model, load_model
from anomdiff.models.config import ModelConfig, load_preset
from anomdiff.models.knn import CategoryReservoir, greedy_coreset, nearest_distance, nearest_neighbours, reweighting

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
    for chunk in (1, 7, 1000):
        assert torch.equal(nearest_neighbours(queries, bank, chunk)[1], torch.cdist(queries, bank).argmin(dim=1))


def test_reweighting_is_equation_7_and_weighs_a_match_in_a_sparse_region_more():
    torch.manual_seed(0)
    dense = torch.randn(20, 4) * 0.05            # a crowd of normal patches
    lonely = torch.tensor([[5.0, 5.0, 5.0, 5.0]])  # one rare normal patch, far from the rest
    bank = torch.cat([dense, lonely])
    query = torch.tensor([0.5, 0.5, 0.5, 0.5])
    distance, match = nearest_neighbours(query[None], bank)
    support = torch.cdist(bank[match], bank)[0].topk(3, largest=False).indices
    by_hand = 1 - torch.exp(distance[0]) / torch.exp(torch.cdist(query[None], bank[support])[0]).sum()
    assert torch.isclose(reweighting(query, int(match), bank, 3), by_hand)
    far_query = torch.tensor([5.5, 5.5, 5.5, 5.5])
    far_match = int(nearest_neighbours(far_query[None], bank)[1])
    assert far_match == 20
    assert reweighting(far_query, far_match, bank, 3) > reweighting(query, int(match), bank, 3)


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
    assert features.shape == (2, model.dim, 16, 16)  # layers 1-2 of efficientnet_lite0: strides 4 and 8
    assert model.dim == 24 + 40
    one = tiny_knn({"knn": {"neighbourhood": 1}}).patch_features(x)
    assert not torch.allclose(features, one)  # the 3 x 3 neighbourhood is averaged in
    finest = 24  # layer 1's channels come first: their window average is computed on their own grid
    assert torch.allclose(features[:, :finest, 5, 5], one[:, :finest, 4:7, 4:7].mean(dim=(-2, -1)), atol=1e-4)


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
    labels = [0] * 6 + [1] * 6
    assert roc_auc_score(labels, torch.cat([ok["image_score"], bad["image_score"]])) >= 0.8
    inside = (bad["anomaly_map"] * masks).sum() / masks.sum()
    outside = (bad["anomaly_map"] * (1 - masks)).sum() / (1 - masks).sum()
    assert inside > 1.5 * outside


def test_the_image_score_is_the_largest_patch_distance_reweighted(fitted):
    x, _ = images(1, 3, seed=300, defects=True)
    plain = ModelConfig.from_dict({"knn": {"reweight_neighbours": 0, "sigma": 0}}, base=fitted.cfg)
    fitted.cfg, saved = plain, fitted.cfg
    try:
        out = fitted.score({"image": x})
        f = fitted.patch_features(x)
        patches = nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), fitted.memory).view(len(x), -1)
        assert torch.allclose(out["image_score"], patches.amax(dim=1))
        fitted.cfg = ModelConfig.from_dict({"knn": {"sigma": 0}}, base=saved)
        weighted = fitted.score({"image": x})["image_score"]
        assert (weighted < out["image_score"]).all() and (weighted > 0).all()  # a weight in (0, 1)
    finally:
        fitted.cfg = saved


def test_an_image_finds_its_own_categorys_bank(fitted):
    for category in (0, 1):
        x, _ = images(category, 4, seed=400 + category, defects=True)
        f = fitted.patch_features(x)
        queries = f.permute(0, 2, 3, 1).reshape(len(x), -1, f.shape[1])
        assert fitted.nearest_category(queries).tolist() == [category] * 4
    fitted.cfg, saved = ModelConfig.from_dict({"knn": {"bank": "nearest_category"}}, base=fitted.cfg), fitted.cfg
    try:
        normal, _ = images(1, 6, seed=100)
        defective, _ = images(1, 6, seed=200, defects=True)
        scores = torch.cat([fitted.score({"image": normal})["image_score"],
                            fitted.score({"image": defective})["image_score"]])
        assert roc_auc_score([0] * 6 + [1] * 6, scores) >= 0.8
    finally:
        fitted.cfg = saved


def test_scores_never_read_the_category_and_survive_save_and_load(fitted, tmp_path):
    x, _ = images(0, 3, seed=7)
    expected = fitted.score({"image": x})
    told = fitted.score({"image": x, "category_index": torch.tensor([1, 1, 1])})
    assert torch.equal(expected["anomaly_map"], told["anomaly_map"])
    fitted.save(tmp_path / "knn", metadata={"categories": ["a", "b"]})
    loaded = load_model(tmp_path / "knn")
    assert loaded.metadata == {"categories": ["a", "b"]} and torch.equal(loaded.memory, fitted.memory)
    assert torch.equal(loaded.score({"image": x})["anomaly_map"], expected["anomaly_map"])


def test_a_knn_model_exported_before_patchcores_scoring_is_refused_with_the_way_out(fitted, tmp_path):
    import json

    fitted.save(tmp_path / "old", metadata={"categories": ["a", "b"]})
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["config"]["knn"]["reweight_neighbours"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="exported before knn scored as PatchCore does"):
        load_model(tmp_path / "old")
