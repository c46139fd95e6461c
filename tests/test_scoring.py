import numpy as np
import pytest
import torch

from anomdiff import scoring


def test_identical_features_give_a_zero_map_at_image_resolution():
    feats = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    maps = scoring.feature_distance(feats, [f.clone() for f in feats], size=(32, 24))
    assert maps.shape == (2, 32, 24)
    assert torch.allclose(maps, torch.zeros_like(maps), atol=1e-6)


def test_distance_is_one_minus_cosine_summed_over_layers():
    a = torch.zeros(1, 2, 2, 2)
    a[:, 0] = 1.0
    b = torch.zeros(1, 2, 2, 2)
    b[:, 1] = 1.0  # orthogonal everywhere: 1 - cos = 1 per layer
    maps = scoring.feature_distance([a, a, a], [b, -a, a], size=(4, 4))
    # orthogonal (1) + opposite (2) + identical (0)
    assert torch.allclose(maps, torch.full((1, 4, 4), 3.0))


def test_distance_rejects_mismatched_layer_lists():
    with pytest.raises(ValueError, match="matching"):
        scoring.feature_distance([torch.randn(1, 2, 2, 2)], [], size=(4, 4))


def test_smoothing_spreads_a_spike_symmetrically_and_keeps_its_mass():
    maps = torch.zeros(1, 33, 33)
    maps[0, 16, 16] = 1.0
    smooth = scoring.gaussian_smooth(maps, sigma=2.0)
    assert smooth[0, 16, 16] < 1.0
    assert smooth.sum().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(smooth[0], smooth[0].flip(0)) and torch.allclose(smooth[0], smooth[0].T)


def test_smoothing_with_zero_sigma_is_identity_and_tiny_maps_do_not_fail():
    maps = torch.rand(2, 8, 8)
    assert torch.equal(scoring.gaussian_smooth(maps, 0.0), maps)
    assert scoring.gaussian_smooth(torch.rand(1, 3, 3), sigma=5.0).shape == (1, 3, 3)


def test_image_score_prefers_a_large_hot_region_over_a_single_hot_pixel():
    maps = torch.zeros(2, 64, 64)
    maps[0, 10, 10] = 10.0  # one outlier pixel
    maps[1, 20:36, 20:36] = 1.0  # a defect-sized region
    score = scoring.image_score(maps, rounds=2, kernel=8)
    assert score.shape == (2,)
    assert score[1] > score[0]
    # without pooling the score is the plain maximum
    assert torch.equal(scoring.image_score(maps, rounds=0), torch.tensor([10.0, 1.0]))


def test_image_score_stops_pooling_when_the_map_gets_smaller_than_the_kernel():
    maps = torch.rand(3, 16, 16)
    score = scoring.image_score(maps, rounds=8, kernel=8)  # 8 rounds would need 57 px
    assert score.shape == (3,) and torch.isfinite(score).all()


def test_anomaly_map_is_the_smoothed_feature_distance():
    a, b = [torch.randn(2, 4, 8, 8)], [torch.randn(2, 4, 8, 8)]
    expected = scoring.gaussian_smooth(scoring.feature_distance(a, b, (16, 16)), 1.5)
    assert torch.allclose(scoring.anomaly_map(a, b, (16, 16), sigma=1.5), expected)


def test_threshold_maximises_f1_on_validation_scores():
    normal = np.array([0.1, 0.2, 0.3, 0.35])
    anomalous = torch.tensor([0.4, 0.8, 0.9])
    threshold = scoring.threshold_from_validation(normal, anomalous)
    assert threshold == pytest.approx(0.4)  # separates the two sets perfectly


def test_threshold_without_anomalies_is_a_quantile_of_normal_scores():
    normal = np.linspace(0, 1, 101)
    assert scoring.threshold_from_validation(normal, quantile=0.95) == pytest.approx(0.95)
    assert scoring.threshold_from_validation(normal, np.array([])) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="normal"):
        scoring.threshold_from_validation([])


def test_pixel_distance_is_the_channel_mean_absolute_difference():
    images = torch.zeros(1, 3, 2, 2)
    reconstructions = torch.zeros(1, 3, 2, 2)
    reconstructions[0, :, 0, 0] = torch.tensor([0.3, -0.6, 0.0])
    expected = torch.tensor([[[0.3, 0.0], [0.0, 0.0]]])
    assert torch.allclose(scoring.pixel_distance(images, reconstructions), expected)
