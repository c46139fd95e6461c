import pickle

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from anomdiff import metrics
from anomdiff.metrics import METRIC_KEYS, PIXEL_KEYS, StreamingMetrics


def synthetic_eval_set(seed=0, per_category=40, size=64, categories=("bottle", "cable")):
    """Maps like a real model's: smooth background noise plus a blurred bump over round defects."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cats, labels, maps, masks = [], [], [], []
    for cat_index, cat in enumerate(categories):
        for i in range(per_category):
            label = i % 2
            mask = np.zeros((size, size), dtype=bool)
            for _ in range(rng.integers(1, 3) * label):
                cy, cx = rng.integers(6, size - 6, 2)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(2, 8) ** 2
            noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2) * 3
            bump = ndimage.gaussian_filter(mask.astype(float), 2) * (1.0 + 0.5 * cat_index)
            cats.append(cat)
            labels.append(label)
            maps.append((noise + bump).astype(np.float32))
            masks.append(mask.astype(np.uint8) * 255)
    maps = np.stack(maps)
    scores = maps.reshape(len(cats), -1).max(axis=1) + rng.normal(scale=0.2, size=len(cats))
    return np.array(cats), scores, np.array(labels), maps, np.stack(masks)


@pytest.fixture(scope="module")
def eval_set():
    return synthetic_eval_set()


@pytest.fixture(scope="module")
def exact_doc(eval_set):
    return metrics.compute(*eval_set)


def slow_aupro(maps, masks, limit=0.3):
    """Independent AUPRO: every distinct score as threshold, overlaps region by region."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask > 0, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    normal = masks == 0
    points = []
    for threshold in np.r_[np.inf, np.unique(maps)[::-1]]:
        predicted = maps >= threshold
        overlaps = [predicted[i][region].mean() for i, region in regions]
        points.append((predicted[normal].mean(), np.mean(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 >= limit:
            break
        if x1 > limit:
            x1, y1 = limit, y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def brute_f1max(labels, scores):
    return max(f1_score(labels, scores >= t) for t in np.unique(scores))


# ----------------------------------------------------------------------------- exact vs references


def test_image_metrics_match_sklearn_per_category(eval_set, exact_doc):
    cats, scores, labels, _, _ = eval_set
    for cat, row in exact_doc["per_category"].items():
        y, s = labels[cats == cat], scores[cats == cat]
        assert row["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
        assert row["image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
        assert row["image_f1max"] == pytest.approx(brute_f1max(y, s), abs=1e-6)


def test_pixel_metrics_match_sklearn_on_the_categorys_flattened_pixels(eval_set, exact_doc):
    cats, _, _, maps, masks = eval_set
    for cat, row in exact_doc["per_category"].items():
        y, s = (masks[cats == cat] > 0).ravel(), maps[cats == cat].ravel()
        assert row["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
        assert row["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)


def test_f1max_is_the_best_f1_score_over_all_thresholds():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.round(labels * 0.6 + rng.normal(size=300), 1)  # rounded: many ties
    assert metrics.f1max(labels, scores) == pytest.approx(brute_f1max(labels, scores), abs=1e-9)


def test_exact_aupro_matches_an_independent_threshold_sweep():
    rng = np.random.default_rng(7)
    masks = np.zeros((5, 14, 14), dtype=np.uint8)
    masks[0, 2:5, 2:5] = 1
    masks[0, 5:7, 5:7] = 1  # touches the first square only diagonally: one 8-connected region
    masks[1, 8:13, 1:3] = 1
    masks[1, 1, 10] = 1  # a one-pixel region
    masks[2, 3:10, 4:11] = 1
    maps = np.round(rng.random(masks.shape) + 0.7 * masks, 1)  # 0.1 steps: many tied scores
    assert metrics.aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks), abs=1e-9)


def test_exact_aupro_matches_the_sweep_on_realistic_maps(eval_set):
    _, _, _, maps, masks = eval_set
    maps, masks = maps[:12, ::2, ::2], masks[:12, ::2, ::2]  # 12 maps at 32 x 32 keep the sweep short
    assert metrics.aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks), abs=1e-9)


def test_aupro_averages_over_regions_not_pixels():
    # A 50-pixel region found at FPR 0 and a 1-pixel region missed: PRO jumps to 0.5, not 50/51.
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, :5, :] = True
    masks[0, 9, 9] = True
    maps = np.zeros((1, 10, 10))
    maps[0, :5, :] = 1.0
    # Curve (0, 0) -> (0, 0.5) -> (1, 1); area over FPR [0, 0.3] is 0.3 * (0.5 + 0.65) / 2.
    assert metrics.aupro(maps, masks) == pytest.approx(0.3 * (0.5 + 0.65) / 2 / 0.3, abs=1e-12)


def test_aupro_of_a_perfect_map_is_one_and_of_a_random_map_about_0_15():
    rng = np.random.default_rng(0)
    masks = np.zeros((50, 32, 32), dtype=bool)
    for i, (y, x) in enumerate(rng.integers(0, 24, (50, 2))):
        masks[i, y:y + 8, x:x + 8] = True
    assert metrics.aupro(masks.astype(float), masks) == pytest.approx(1.0)
    # PRO equals FPR on average: the integral of x over [0, 0.3], divided by 0.3, is 0.15.
    assert metrics.aupro(rng.random(masks.shape), masks) == pytest.approx(0.15, abs=0.01)


def test_auroc_below_half_is_reported_not_flipped(eval_set):
    cats, scores, labels, maps, masks = eval_set
    doc = metrics.compute(cats, -scores, labels, -maps, masks)
    for cat, row in doc["per_category"].items():
        assert row["image_auroc"] == pytest.approx(roc_auc_score(labels[cats == cat], -scores[cats == cat]))
        assert row["image_auroc"] < 0.5
        assert row["pixel_auroc"] < 0.5


def test_masks_as_bool_0_1_or_0_255_give_the_same_metrics(eval_set, exact_doc):
    cats, scores, labels, maps, masks = eval_set
    for variant in (masks > 0, (masks > 0).astype(np.int64), masks.astype(np.float32)):
        assert metrics.compute(cats, scores, labels, maps, variant) == exact_doc


def test_mean_is_the_unweighted_mean_over_categories():
    rng = np.random.default_rng(1)
    cats = np.array(["big"] * 200 + ["small"] * 10)
    labels = np.tile([0, 1], 105)
    scores = labels + rng.normal(size=210)
    doc = metrics.compute(cats, scores, labels)
    per_cat = [doc["per_category"][c]["image_auroc"] for c in ("big", "small")]
    assert doc["mean"]["image_auroc"] == pytest.approx(np.mean(per_cat))
    assert doc["num_images"] == 210


def test_document_has_every_key_and_null_pixel_metrics_without_maps(eval_set):
    cats, scores, labels, _, _ = eval_set
    doc = metrics.compute(cats, scores, labels)
    assert set(doc) == {"num_images", "mean", "per_category"}
    assert set(doc["mean"]) == set(METRIC_KEYS)
    for row in [doc["mean"], *doc["per_category"].values()]:
        assert all(row[key] is None for key in PIXEL_KEYS)
        assert all(0.0 <= row[key] <= 1.0 for key in ("image_auroc", "image_ap", "image_f1max"))


# ----------------------------------------------------------------------------- undefined and bad input


def test_one_class_category_gets_null_metrics_and_is_left_out_of_the_mean(eval_set):
    cats, scores, labels, maps, masks = eval_set
    cats = np.where(np.arange(cats.size) < 3, "only_normals", cats)
    labels = np.where(cats == "only_normals", 0, labels)
    masks = np.where((cats == "only_normals")[:, None, None], 0, masks)
    doc = metrics.compute(cats, scores, labels, maps, masks)
    assert all(value is None for value in doc["per_category"]["only_normals"].values())
    defined = [row["aupro"] for cat, row in doc["per_category"].items() if cat != "only_normals"]
    assert doc["mean"]["aupro"] == pytest.approx(np.mean(defined))


def test_anomalous_images_with_empty_masks_give_null_pixel_metrics():
    rng = np.random.default_rng(2)
    doc = metrics.compute(["a"] * 4, rng.random(4), [0, 1, 0, 1], rng.random((4, 8, 8)), np.zeros((4, 8, 8)))
    row = doc["per_category"]["a"]
    assert row["image_auroc"] is not None
    assert all(row[key] is None for key in PIXEL_KEYS)
    assert all(doc["mean"][key] is None for key in PIXEL_KEYS)


def _entry_points():
    def exact(*args):
        return metrics.compute(*args)

    def streaming(*args):
        StreamingMetrics(score_range=(-10.0, 10.0)).update(*args)

    return [exact, streaming]


def _small_inputs():
    rng = np.random.default_rng(4)
    return ["a"] * 6, rng.random(6), np.array([0, 1] * 3), rng.random((6, 8, 8)), rng.random((6, 8, 8)) > 0.8


@pytest.mark.parametrize("entry", _entry_points(), ids=["exact", "streaming"])
@pytest.mark.parametrize(("position", "bad", "message"), [
    (0, ["a"] * 5, "categories has shape"),
    (2, np.array([0, 1] * 2), "image_labels has shape"),
    (2, np.array([0, 1, 2, 0, 1, 0]), "must be 0"),
    (3, np.zeros((5, 8, 8)), "5 maps for 6 image scores"),
    (3, np.zeros((6, 1, 8, 8)), "must be N x H x W"),
    (4, np.zeros((6, 8, 9)), "masks has shape"),
    (4, None, "both anomaly_maps and masks"),
])
def test_mismatched_or_malformed_inputs_raise_naming_the_array(entry, position, bad, message):
    args = list(_small_inputs())
    args[position] = bad
    with pytest.raises(ValueError, match=message):
        entry(*args)


@pytest.mark.parametrize("entry", _entry_points(), ids=["exact", "streaming"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_scores_raise_with_their_positions(entry, value):
    cats, scores, labels, maps, masks = _small_inputs()
    scores = scores.copy()
    scores[4] = value
    with pytest.raises(ValueError, match=r"image_scores has 1 NaN or inf values, at indices \[4\]"):
        entry(cats, scores, labels, maps, masks)
    scores[4] = 0.5
    maps = maps.copy()
    maps[2, 3, 3] = value
    with pytest.raises(ValueError, match=r"anomaly_maps has NaN or inf values in 1 maps, at indices \[2\]"):
        entry(cats, scores, labels, maps, masks)


def test_empty_input_raises():
    with pytest.raises(ValueError, match="no images"):
        metrics.compute([], [], [])


# ----------------------------------------------------------------------------- streaming


def _stream(eval_set, score_range, batch=7, num_bins=metrics.DEFAULT_NUM_BINS):
    accumulator = StreamingMetrics(score_range=score_range, num_bins=num_bins)
    cats, scores, labels, maps, masks = eval_set
    for start in range(0, cats.size, batch):
        part = slice(start, start + batch)
        accumulator.update(cats[part], scores[part], labels[part], maps[part], masks[part])
    return accumulator


def _calibrated_range(eval_set):
    _, _, labels, maps, _ = eval_set
    return metrics.calibrate_score_range(maps[labels == 0])  # as on held-out normals


def test_streaming_image_metrics_equal_exact(eval_set, exact_doc):
    doc = _stream(eval_set, _calibrated_range(eval_set)).compute()
    assert doc["num_images"] == exact_doc["num_images"]
    for cat, row in exact_doc["per_category"].items():
        for key in ("image_auroc", "image_ap", "image_f1max"):
            assert doc["per_category"][cat][key] == pytest.approx(row[key], abs=1e-12)


def test_streaming_pixel_metrics_are_within_0_002_of_exact_and_within_the_reported_bound(eval_set, exact_doc):
    accumulator = _stream(eval_set, _calibrated_range(eval_set))
    doc, bounds = accumulator.compute(), accumulator.error_bounds()
    for cat, row in exact_doc["per_category"].items():
        streamed = doc["per_category"][cat]
        for key in PIXEL_KEYS:
            assert streamed[key] == pytest.approx(row[key], abs=0.002), key
        for key in ("pixel_auroc", "aupro"):
            assert abs(streamed[key] - row[key]) <= bounds[cat][key] + 1e-12
            assert bounds[cat][key] < 0.002
        assert streamed["pixel_f1max"] <= row["pixel_f1max"] + 1e-12


def test_scores_outside_the_range_clamp_to_edge_bins_and_widen_the_bound(eval_set, exact_doc):
    _, _, _, maps, _ = eval_set
    lo, hi = np.quantile(maps, [0.2, 0.8])  # a fifth of all pixels on either side is clamped
    wide = _stream(eval_set, (float(maps.min()), float(maps.max()))).error_bounds()
    clamped = _stream(eval_set, (float(lo), float(hi)))
    doc, bounds = clamped.compute(), clamped.error_bounds()
    for cat, row in exact_doc["per_category"].items():
        for key in ("pixel_auroc", "aupro"):
            assert abs(doc["per_category"][cat][key] - row[key]) <= bounds[cat][key] + 1e-12
            assert bounds[cat][key] > wide[cat][key]


def test_coarse_bins_stay_within_their_reported_bound(eval_set, exact_doc):
    accumulator = _stream(eval_set, _calibrated_range(eval_set), num_bins=16)
    doc, bounds = accumulator.compute(), accumulator.error_bounds()
    for cat, row in exact_doc["per_category"].items():
        for key in ("pixel_auroc", "aupro"):
            assert abs(doc["per_category"][cat][key] - row[key]) <= bounds[cat][key] + 1e-12


def test_merged_worker_partials_equal_a_single_pass_after_pickling(eval_set):
    score_range = _calibrated_range(eval_set)
    single = _stream(eval_set, score_range).compute()
    cats, scores, labels, maps, masks = eval_set
    workers = [StreamingMetrics(score_range=score_range) for _ in range(3)]
    for start in range(0, cats.size, 5):
        part = slice(start, start + 5)
        workers[(start // 5) % 3].update(cats[part], scores[part], labels[part], maps[part], masks[part])
    shipped = [pickle.loads(pickle.dumps(worker)) for worker in workers]
    merged = (shipped[0] + shipped[1]).merge(shipped[2]).compute()
    assert merged["num_images"] == single["num_images"]
    for cat, row in single["per_category"].items():
        assert merged["per_category"][cat] == pytest.approx(row, abs=1e-12)


def test_streaming_state_does_not_grow_with_the_number_of_pixels(eval_set):
    cats, scores, labels, maps, masks = eval_set
    accumulator = StreamingMetrics(score_range=_calibrated_range(eval_set))
    accumulator.update(cats[:10], scores[:10], labels[:10], maps[:10], masks[:10])
    before = len(pickle.dumps(accumulator))
    for _ in range(20):  # 20 x 10 more maps, 819,200 more pixels
        accumulator.update(cats[:10], scores[:10], labels[:10], maps[:10], masks[:10])
    growth = len(pickle.dumps(accumulator)) - before
    assert growth <= 200 * 9 + 64  # a float64 score and a uint8 label per image, nothing per pixel


def test_streaming_without_maps_gives_null_pixel_metrics(eval_set):
    cats, scores, labels, _, _ = eval_set
    accumulator = StreamingMetrics()
    accumulator.update(cats, scores, labels)
    doc = accumulator.compute()
    assert doc == metrics.compute(cats, scores, labels)


def test_streaming_maps_need_a_score_range(eval_set):
    with pytest.raises(ValueError, match="score_range"):
        StreamingMetrics().update(*eval_set)


def test_streaming_rejects_batches_with_and_without_maps(eval_set):
    cats, scores, labels, maps, masks = eval_set
    accumulator = StreamingMetrics(score_range=(0.0, 1.0))
    accumulator.update(cats, scores, labels, maps, masks)
    with pytest.raises(ValueError, match="every batch"):
        accumulator.update(cats, scores, labels)
    without = StreamingMetrics(score_range=(0.0, 1.0))
    without.update(cats, scores, labels)
    with pytest.raises(ValueError, match="cannot merge"):
        accumulator.merge(without)


def test_merging_differently_binned_accumulators_raises():
    with pytest.raises(ValueError, match="different"):
        StreamingMetrics(score_range=(0.0, 1.0)).merge(StreamingMetrics(score_range=(0.0, 2.0)))
    with pytest.raises(ValueError, match="different"):
        StreamingMetrics(score_range=(0.0, 1.0), num_bins=8).merge(StreamingMetrics(score_range=(0.0, 1.0)))


@pytest.mark.parametrize("score_range", [(1.0, 1.0), (0.0, np.inf), (2.0, 1.0)])
def test_invalid_score_range_raises(score_range):
    with pytest.raises(ValueError, match="score_range"):
        StreamingMetrics(score_range=score_range)


def test_compute_on_an_empty_accumulator_raises():
    with pytest.raises(ValueError, match="no batches"):
        StreamingMetrics().compute()


# ----------------------------------------------------------------------------- curves and calibration


def test_curves_run_from_origin_to_one_with_bounded_length(eval_set):
    curves = metrics.compute_curves(*eval_set, max_points=100)
    assert set(curves) == {"image", "pixel"}
    for level in ("image", "pixel"):
        assert set(curves[level]) == {"bottle", "cable"}
        for curve in curves[level].values():
            assert len(curve["fpr"]) <= 100 and len(curve["recall"]) <= 100
            assert np.all(np.diff(curve["fpr"]) >= 0) and np.all(np.diff(curve["tpr"]) >= 0)
            assert (curve["fpr"][0], curve["tpr"][0]) == (0.0, 0.0)
            assert curve["fpr"][-1] == pytest.approx(1.0) and curve["tpr"][-1] == pytest.approx(1.0)
            assert curve["recall"].min() == 0.0 and curve["recall"].max() == pytest.approx(1.0)


def test_curves_without_maps_have_no_pixel_curves(eval_set):
    cats, scores, labels, _, _ = eval_set
    assert metrics.compute_curves(cats, scores, labels)["pixel"] == {}


def test_calibrated_range_leaves_headroom_above_the_normal_maximum():
    assert metrics.calibrate_score_range(np.array([[1.0, 3.0]]), headroom=0.5) == (1.0, 4.0)
    lo, hi = metrics.calibrate_score_range(np.full((2, 2), 5.0))
    assert lo == 5.0 and hi > lo
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.calibrate_score_range(np.array([0.0, np.nan]))


def test_decisions_at_a_fixed_threshold_agree_with_scikit_learn_per_category():
    rng = np.random.default_rng(3)
    cats = np.array(["a"] * 30 + ["b"] * 20 + ["c"] * 10)
    labels = rng.integers(0, 2, 60)
    labels[50:] = 0  # category c has no anomalous image: recall and F1 undefined there
    scores = labels * 0.6 + rng.random(60)
    doc = metrics.at_threshold(cats, scores, labels, 0.8)
    for cat in ("a", "b"):
        pick = cats == cat
        decided = scores[pick] >= 0.8
        row = doc["per_category"][cat]
        assert row["image_f1"] == pytest.approx(f1_score(labels[pick], decided))
        assert row["image_precision"] == pytest.approx(precision_score(labels[pick], decided, zero_division=0))
        assert row["image_recall"] == pytest.approx(recall_score(labels[pick], decided))
    assert doc["per_category"]["c"]["image_f1"] is None and doc["per_category"]["c"]["image_recall"] is None
    assert doc["mean"]["image_f1"] == pytest.approx(np.mean([doc["per_category"][c]["image_f1"] for c in "ab"]))
    assert doc["threshold"] == 0.8
