"""Anomaly-detection metrics, exact and streaming, behind one document format.

Image level: AUROC, AP and F1max of one score per image. Pixel level: AUROC, AP and F1max over
every pixel of a category, and AUPRO (Bergmann et al., "The MVTec Anomaly Detection Dataset",
IJCV 2021): regions are the 8-connected components of each ground-truth mask; at a threshold,
PRO is the mean over all regions of the fraction of the region's pixels scoring at or above it,
and FPR is the fraction of normal pixels (mask 0, in any image) scoring at or above it; the PRO
curve is integrated over FPR in [0, 0.3] by the trapezoid rule and divided by 0.3.

F1max is the largest F1 = 2PR / (P + R) over all thresholds of the precision-recall curve.
An AUROC below 0.5 is reported as it is, never flipped.

Two entry points produce the same document (README, "Metrics")::

    {"num_images": N,
     "mean": {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"},
     "per_category": {category: {same keys}}}

- :func:`compute` is exact and in memory; AUROC, AP and the precision-recall curve come from
  scikit-learn.
- :class:`StreamingMetrics` takes batches, merges partial states (e.g. from Ray workers) and
  finishes with :meth:`StreamingMetrics.compute`; its pixel state has a fixed size.

A metric is ``None`` (JSON ``null``) where it is undefined: for a category whose images (or
pixels) are all of one class, and for the pixel metrics when no maps are given. ``mean`` is the
unweighted mean over the categories where the metric is defined, and ``None`` when it is defined
for none. Malformed input (mismatched shapes, NaN or inf scores, labels other than 0/1) raises
``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
METRIC_KEYS = IMAGE_KEYS + PIXEL_KEYS
AUPRO_FPR_LIMIT = 0.3
DEFAULT_NUM_BINS = 2**14

# 8-connectivity inside each image, no connectivity across the image axis of an N x H x W stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# ----------------------------------------------------------------------------- input checks


def _validate(categories, image_scores, image_labels, anomaly_maps=None, masks=None):
    """Check and normalise inputs; returns (categories str, scores f64, labels u8, maps, masks bool)."""
    scores = np.asarray(image_scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"image_scores must be one-dimensional, got shape {scores.shape}")
    n = scores.shape[0]
    if n == 0:
        raise ValueError("no images: image_scores is empty")
    cats = np.asarray(categories)
    if cats.shape != (n,):
        raise ValueError(f"categories has shape {cats.shape}, image_scores has {scores.shape}")
    cats = cats.astype(str)
    labels = np.asarray(image_labels)
    if labels.shape != (n,):
        raise ValueError(f"image_labels has shape {labels.shape}, image_scores has {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"image_labels must be 0 (normal) or 1 (anomalous), got values {np.unique(labels)}")
    labels = labels.astype(np.uint8)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"image_scores has {bad.size} NaN or inf values, at indices {bad[:10].tolist()}")

    if (anomaly_maps is None) != (masks is None):
        raise ValueError("pixel metrics need both anomaly_maps and masks; got only one of them")
    if anomaly_maps is None:
        return cats, scores, labels, None, None
    maps, gt = _validate_maps(anomaly_maps, masks, num_images=n)
    return cats, scores, labels, maps, gt


def _validate_maps(anomaly_maps, masks, num_images=None):
    """Check N x H x W maps and masks of the same shape; masks are binarised as ``mask > 0``."""
    maps = np.asarray(anomaly_maps)
    if maps.ndim != 3:
        raise ValueError(f"anomaly_maps must be N x H x W, got shape {maps.shape}")
    if num_images is not None and maps.shape[0] != num_images:
        raise ValueError(f"anomaly_maps has {maps.shape[0]} maps for {num_images} image scores")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    masks = np.asarray(masks)
    if masks.shape != maps.shape:
        raise ValueError(f"masks has shape {masks.shape}, anomaly_maps has {maps.shape}")
    finite = np.isfinite(maps).reshape(maps.shape[0], -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"anomaly_maps has NaN or inf values in {bad.size} maps, at indices {bad[:10].tolist()}")
    return maps, masks > 0


# ----------------------------------------------------------------------------- exact


def f1max(labels, scores) -> float:
    """Largest F1 over the thresholds of scikit-learn's ``precision_recall_curve``."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


def at_threshold(categories, image_scores, image_labels, threshold: float) -> dict:
    """Decisions at one fixed threshold (``score >= threshold``: anomalous), as a deployed model makes
    them: image precision, recall and F1 per category (scikit-learn) and their unweighted mean.
    ``{"threshold": t, "mean": {...}, "per_category": {cat: {"image_precision", "image_recall",
    "image_f1"}}}``; a category with no anomalous image has recall and F1 ``None``."""
    cats = np.asarray(categories).astype(str)
    scores, labels = np.asarray(image_scores, np.float64), np.asarray(image_labels).astype(int)
    rows = {}
    for cat in sorted(set(cats.tolist())):
        pick = cats == cat
        decided = (scores[pick] >= threshold).astype(int)
        precision, recall, f1, _ = precision_recall_fscore_support(labels[pick], decided, average="binary",
                                                                   zero_division=0.0)
        defined = bool(labels[pick].any())
        rows[cat] = {"image_precision": float(precision), "image_recall": float(recall) if defined else None,
                     "image_f1": float(f1) if defined else None}
    keys = ("image_precision", "image_recall", "image_f1")
    mean = {k: (float(np.mean(v)) if (v := [r[k] for r in rows.values() if r[k] is not None]) else None) for k in keys}
    return {"threshold": float(threshold), "mean": mean, "per_category": rows}


def _binary_metrics(labels, scores) -> tuple[float | None, float | None, float | None]:
    """(AUROC, AP, F1max) with scikit-learn, or three ``None`` when only one class is present."""
    positives = int(np.count_nonzero(labels))
    if positives == 0 or positives == labels.size:
        return None, None, None
    auroc = float(roc_auc_score(labels, scores))
    ap = float(average_precision_score(labels, scores))
    return auroc, ap, f1max(labels, scores)


def _label_regions(gt: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected ground-truth regions of each N x H x W mask; regions never span images."""
    regions, count = ndimage.label(gt, structure=_REGION_STRUCTURE)
    return regions, int(count)


def _inverse_region_sizes(regions: np.ndarray) -> np.ndarray:
    """1 / pixel count per region label, 0 for label 0 (normal pixels)."""
    sizes = np.bincount(regions.ravel()).astype(np.float64)
    inverse = np.zeros_like(sizes)
    np.divide(1.0, sizes, out=inverse, where=sizes > 0)
    inverse[0] = 0.0
    return inverse


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x, y) for x in [0, limit]; x non-decreasing, x[0] = 0.

    The last segment is cut at ``limit`` with y interpolated linearly.
    """
    inside = int(np.searchsorted(x, limit, side="right"))
    area = float(np.trapezoid(y[:inside], x[:inside]))
    if inside < x.size:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2
    return float(area)


def aupro(anomaly_maps, masks, *, fpr_limit: float = AUPRO_FPR_LIMIT) -> float | None:
    """Exact normalised AUPRO of N x H x W maps against masks (``mask > 0`` is anomalous).

    Per Bergmann et al. (MVTec AD): sweep every distinct score as a threshold, take PRO (mean
    region overlap over the 8-connected regions of all masks) against FPR (over all normal
    pixels), integrate PRO over FPR in [0, ``fpr_limit``] and divide by ``fpr_limit``.
    ``None`` when the masks have no region or no normal pixel.
    """
    maps, gt = _validate_maps(anomaly_maps, masks)
    return _aupro(maps, gt, fpr_limit)


def _aupro(maps: np.ndarray, gt: np.ndarray, fpr_limit: float) -> float | None:
    """:func:`aupro` of checked maps and boolean masks."""
    regions, n_regions = _label_regions(gt)
    n_normal = int(gt.size - np.count_nonzero(gt))
    if n_regions == 0 or n_normal == 0:
        return None
    overlap_weight = _inverse_region_sizes(regions)
    scores = maps.ravel()
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    sorted_regions = regions.ravel()[order]
    del order
    # One point per distinct score: the last pixel of each run of equal scores.
    last_of_tie = np.empty(sorted_scores.size, dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=last_of_tie[:-1])
    last_of_tie[-1] = True
    del sorted_scores
    pro = np.cumsum(overlap_weight[sorted_regions])[last_of_tie] / n_regions
    fpr = np.cumsum(sorted_regions == 0)[last_of_tie] / n_normal
    fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
    return float(_area_to_limit(fpr, pro, fpr_limit) / fpr_limit)


def _document(rows: dict[str, dict], num_images: int) -> dict:
    """Assemble the metrics document; ``mean`` skips categories where a metric is ``None``."""
    per_category = {cat: rows[cat] for cat in sorted(rows)}
    mean = {}
    for key in METRIC_KEYS:
        defined = [row[key] for row in per_category.values() if row[key] is not None]
        mean[key] = float(np.mean(defined)) if defined else None
    return {"num_images": int(num_images), "mean": mean, "per_category": per_category}


def compute(categories, image_scores, image_labels, anomaly_maps=None, masks=None, *,
            fpr_limit: float = AUPRO_FPR_LIMIT) -> dict:
    """Exact metrics document for in-memory arrays.

    ``categories``, ``image_scores``, ``image_labels``: length N; labels 0 normal, 1 anomalous.
    ``anomaly_maps`` and ``masks``: N x H x W, both or neither; masks may be bool, 0/1 or 0/255
    (binarised as ``> 0``). Without them the pixel keys are ``None``.
    Memory and time: the pixel metrics of a category sort all of its pixels four times (about 80
    bytes per pixel of the category at peak, beyond the inputs); for large test sets use
    :class:`StreamingMetrics`.
    """
    cats, scores, labels, maps, gt = _validate(categories, image_scores, image_labels, anomaly_maps, masks)
    rows = {}
    for cat in np.unique(cats):
        idx = np.flatnonzero(cats == cat)
        row = dict(zip(IMAGE_KEYS, _binary_metrics(labels[idx], scores[idx]), strict=True))
        row.update(dict.fromkeys(PIXEL_KEYS))
        if maps is not None:
            whole = idx.size == cats.size
            cat_maps, cat_gt = (maps, gt) if whole else (maps[idx], gt[idx])
            pixel = _binary_metrics(cat_gt.ravel().view(np.uint8), cat_maps.ravel())
            if pixel[0] is not None:
                row.update(zip(("pixel_auroc", "pixel_ap", "pixel_f1max"), pixel, strict=True))
                row["aupro"] = _aupro(cat_maps, cat_gt, fpr_limit)
        rows[str(cat)] = row
    return _document(rows, scores.size)


# ----------------------------------------------------------------------------- streaming


@dataclass
class _PixelHistograms:
    """Fixed-size pixel state of one category.

    ``counts[0]`` / ``counts[1]``: normal / anomalous pixels per score bin. ``overlap[b]``: sum
    over regions of the fraction of the region's pixels in bin b. ``regions``: region count.
    """

    counts: np.ndarray
    overlap: np.ndarray
    regions: int = 0

    @classmethod
    def empty(cls, num_bins: int) -> _PixelHistograms:
        return cls(np.zeros((2, num_bins), dtype=np.int64), np.zeros(num_bins, dtype=np.float64))

    def add(self, bins: np.ndarray, gt: np.ndarray) -> None:
        num_bins = self.overlap.size
        by_class = np.bincount(bins.ravel() + num_bins * gt.ravel(), minlength=2 * num_bins)
        self.counts += by_class.reshape(2, num_bins)
        regions, count = _label_regions(gt)
        if count:
            inside = regions > 0
            weights = _inverse_region_sizes(regions)[regions[inside]]
            self.overlap += np.bincount(bins[inside], weights=weights, minlength=num_bins)
            self.regions += count

    def merge(self, other: _PixelHistograms) -> None:
        self.counts += other.counts
        self.overlap += other.overlap
        self.regions += other.regions

    def curves(self) -> dict[str, np.ndarray] | None:
        """Cumulative curves at the bin edges, thresholds descending; ``None`` for one class."""
        normal, anomalous = self.counts.astype(np.float64)
        n_normal, n_anomalous = normal.sum(), anomalous.sum()
        if n_normal == 0 or n_anomalous == 0:
            return None
        tp = np.cumsum(anomalous[::-1])
        fp = np.cumsum(normal[::-1])
        predicted = tp + fp
        # Before the first bin with pixels, nothing is predicted: precision 1, as scikit-learn has it.
        precision = np.divide(tp, predicted, out=np.ones_like(tp), where=predicted > 0)
        pro = np.cumsum(self.overlap[::-1]) / self.regions if self.regions else None
        return {"tp": tp, "fp": fp, "precision": precision, "positives": n_anomalous,
                "fpr": np.r_[0.0, fp / n_normal], "tpr": np.r_[0.0, tp / n_anomalous],
                "pro": None if pro is None else np.r_[0.0, pro]}

    def metrics(self, fpr_limit: float) -> dict[str, float | None]:
        c = self.curves()
        if c is None:
            return dict.fromkeys(PIXEL_KEYS)
        recall_gain = np.diff(np.r_[0.0, c["tp"]]) / c["positives"]
        return {
            "pixel_auroc": float(np.trapezoid(c["tpr"], c["fpr"])),
            "pixel_ap": float(np.sum(recall_gain * c["precision"])),
            "pixel_f1max": float(np.max(2 * c["tp"] / (c["tp"] + c["fp"] + c["positives"]))),
            "aupro": None if c["pro"] is None else _area_to_limit(c["fpr"], c["pro"], fpr_limit) / fpr_limit,
        }

    def error_bounds(self, fpr_limit: float) -> dict[str, float | None]:
        """Largest possible |binned - exact| for pixel AUROC and AUPRO (see StreamingMetrics)."""
        c = self.curves()
        if c is None:
            return {"pixel_auroc": None, "aupro": None}
        auroc_bound = 0.5 * float(np.sum(np.diff(c["fpr"]) * np.diff(c["tpr"])))
        if c["pro"] is None:
            return {"pixel_auroc": auroc_bound, "aupro": None}
        cells = np.diff(c["fpr"]) * np.diff(c["pro"])
        starts, ends = c["fpr"][:-1], c["fpr"][1:]
        inside = ends <= fpr_limit
        crossing = (starts < fpr_limit) & (ends > fpr_limit)
        aupro_bound = (0.5 * cells[inside].sum() + cells[crossing].sum()) / fpr_limit
        return {"pixel_auroc": auroc_bound, "aupro": float(aupro_bound)}


@dataclass(eq=False)
class StreamingMetrics:
    """Accumulate metrics over batches and merge partial states; ``compute()`` gives the document.

    Image level is exact: the accumulator keeps every image score and label (9 bytes per image),
    so its memory grows with the number of images, never with pixels.

    Pixel level keeps, per category, fixed-bin histograms over ``score_range`` (``num_bins``
    equal bins): normal and anomalous pixel counts, and for AUPRO the per-bin sum over regions of
    the fraction of the region's pixels in the bin plus the region count; the AUPRO FPR uses the
    normal-pixel histogram. State per category is ``3 * num_bins * 8`` bytes (384 KiB at the
    default 2**14 bins) whatever the number of pixels. Scores outside ``score_range`` fall into
    the first or last bin.

    How far it may be from exact: every curve is exact at the bin edges, because the bin of a
    score is monotone in the score; only the path inside a bin is replaced by a straight line.
    - Pixel AUROC: |binned - exact| <= 0.5 * sum over bins of (normal fraction in bin) *
      (anomalous fraction in bin); AUPRO likewise with the region-overlap fraction, over the bins
      below FPR 0.3, divided by 0.3. :meth:`error_bounds` reports both. Clamping only makes the
      edge bins fuller: the bounds include it, and it costs little while few normal pixels lie
      outside the range (e.g. range calibrated on validation maps with headroom, see
      :func:`calibrate_score_range`).
    - Pixel F1max: the binned operating points are a subset of the exact ones, so binned <=
      exact; pixel AP is the step-wise AP at the bin edges. Neither has a closed-form bound; on
      realistic maps with 2**14 bins over a calibrated range all four pixel metrics are within
      0.002 of exact (tests/test_metrics.py pins it).
    """

    score_range: tuple[float, float] | None = None
    num_bins: int = DEFAULT_NUM_BINS
    fpr_limit: float = AUPRO_FPR_LIMIT
    _scores: dict[str, list[np.ndarray]] = field(default_factory=dict, init=False, repr=False)
    _labels: dict[str, list[np.ndarray]] = field(default_factory=dict, init=False, repr=False)
    _pixels: dict[str, _PixelHistograms] = field(default_factory=dict, init=False, repr=False)
    _with_maps: bool | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.score_range is not None:
            lo, hi = (float(v) for v in self.score_range)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"score_range must be finite with lo < hi, got {self.score_range}")
            self.score_range = (lo, hi)
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {self.num_bins}")
        if not 0 < self.fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {self.fpr_limit}")

    def _bins(self, maps: np.ndarray) -> np.ndarray:
        """Bin index per pixel: monotone in the score, clamped to [0, num_bins - 1]."""
        lo, hi = self.score_range
        scale = np.float32(self.num_bins / (hi - lo))
        scaled = (maps.astype(np.float32, copy=False) - np.float32(lo)) * scale
        np.clip(scaled, 0, self.num_bins - 1, out=scaled)
        return scaled.astype(np.intp)

    def update(self, categories, image_scores, image_labels, anomaly_maps=None, masks=None) -> None:
        """Add one batch; same arguments as :func:`compute`. Every batch has maps or none does."""
        checked = _validate(categories, image_scores, image_labels, anomaly_maps, masks)
        cats, scores, labels, maps, gt = checked
        with_maps = maps is not None
        if self._with_maps is not None and self._with_maps != with_maps:
            raise ValueError("every batch must come with anomaly maps and masks, or none may")
        if with_maps and self.score_range is None:
            raise ValueError("pixel metrics in streaming mode need score_range=(lo, hi) set up front")
        self._with_maps = with_maps
        bins = self._bins(maps) if with_maps else None
        for cat in np.unique(cats):
            idx = np.flatnonzero(cats == cat)
            whole = idx.size == cats.size
            key = str(cat)
            self._scores.setdefault(key, []).append(scores if whole else scores[idx])
            self._labels.setdefault(key, []).append(labels if whole else labels[idx])
            if with_maps:
                state = self._pixels.setdefault(key, _PixelHistograms.empty(self.num_bins))
                state.add(bins if whole else bins[idx], gt if whole else gt[idx])

    def _config(self) -> tuple:
        return self.score_range, self.num_bins, self.fpr_limit

    def merge(self, other: StreamingMetrics) -> StreamingMetrics:
        """Fold ``other`` (e.g. a Ray worker's partial state) into this one; returns self."""
        mine, theirs = self._config(), other._config()
        if mine != theirs:
            raise ValueError(
                "cannot merge accumulators with different (score_range, num_bins, fpr_limit): "
                f"{mine} vs {theirs}")
        if None not in (self._with_maps, other._with_maps) and self._with_maps != other._with_maps:
            raise ValueError("cannot merge an accumulator with anomaly maps into one without")
        if self._with_maps is None:
            self._with_maps = other._with_maps
        for cat in other._scores:
            self._scores.setdefault(cat, []).extend(other._scores[cat])
            self._labels.setdefault(cat, []).extend(other._labels[cat])
        for cat, state in other._pixels.items():
            mine = self._pixels.setdefault(cat, _PixelHistograms.empty(self.num_bins))
            mine.merge(state)
        return self

    def __add__(self, other: StreamingMetrics) -> StreamingMetrics:
        result = StreamingMetrics(self.score_range, self.num_bins, self.fpr_limit)
        return result.merge(self).merge(other)

    def __getstate__(self) -> dict:
        # Pickle one array per category instead of one per batch.
        state = dict(self.__dict__)
        state["_scores"] = {cat: [np.concatenate(parts)] for cat, parts in self._scores.items()}
        state["_labels"] = {cat: [np.concatenate(parts)] for cat, parts in self._labels.items()}
        return state

    def _image_arrays(self, cat: str) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self._labels[cat]), np.concatenate(self._scores[cat])

    def compute(self) -> dict:
        """The metrics document of everything added so far."""
        if not self._scores:
            raise ValueError("no batches were added")
        rows, num_images = {}, 0
        for cat in self._scores:
            labels, scores = self._image_arrays(cat)
            num_images += scores.size
            row = dict(zip(IMAGE_KEYS, _binary_metrics(labels, scores), strict=True))
            if self._with_maps:
                row.update(self._pixels[cat].metrics(self.fpr_limit))
            else:
                row.update(dict.fromkeys(PIXEL_KEYS))
            rows[cat] = row
        return _document(rows, num_images)

    def error_bounds(self) -> dict[str, dict[str, float | None]]:
        """Per category, the largest possible |streaming - exact| of pixel AUROC and AUPRO."""
        return {cat: self._pixels[cat].error_bounds(self.fpr_limit) for cat in sorted(self._pixels)}

    def curves(self, max_points: int = 512) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """ROC and PR curves per category for plotting, each thinned to at most ``max_points``.

        ``{"image": {cat: {"fpr", "tpr", "precision", "recall"}}, "pixel": {...}}``; image
        curves from scikit-learn, pixel curves from the histograms; one-class categories are left out.
        """
        result = {"image": {}, "pixel": {}}
        for cat in sorted(self._scores):
            labels, scores = self._image_arrays(cat)
            if 0 < np.count_nonzero(labels) < labels.size:
                fpr, tpr, _ = roc_curve(labels, scores)
                precision, recall, _ = precision_recall_curve(labels, scores)
                result["image"][cat] = {**_thin(fpr=fpr, tpr=tpr, max_points=max_points),
                                        **_thin(precision=precision, recall=recall, max_points=max_points)}
            c = self._pixels[cat].curves() if cat in self._pixels else None
            if c is not None:
                precision, recall = np.r_[1.0, c["precision"]], np.r_[0.0, c["tp"] / c["positives"]]
                pr = _thin(precision=precision, recall=recall, max_points=max_points)
                result["pixel"][cat] = {**_thin(fpr=c["fpr"], tpr=c["tpr"], max_points=max_points), **pr}
        return result


def _thin(*, max_points: int, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Keep at most ``max_points`` evenly spaced points (ends included) of equally long arrays."""
    n = len(next(iter(arrays.values())))
    if n <= max_points:
        return arrays
    keep = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.intp))
    return {name: values[keep] for name, values in arrays.items()}


def calibrate_score_range(anomaly_maps, *, headroom: float = 1.0) -> tuple[float, float]:
    """A ``score_range`` for :class:`StreamingMetrics` from maps of held-out normal images.

    ``(min, max + headroom * (max - min))``: anomalous pixels usually score above every normal
    one, so the upper end leaves room for them rather than piling them into the last bin.
    """
    maps = np.asarray(anomaly_maps)
    if maps.size == 0:
        raise ValueError("no anomaly maps to calibrate on")
    lo, hi = float(maps.min()), float(maps.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("anomaly maps to calibrate on contain NaN or inf")
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo, hi + headroom * span


def compute_curves(categories, image_scores, image_labels, anomaly_maps=None, masks=None, *,
                   num_bins: int = DEFAULT_NUM_BINS, max_points: int = 512) -> dict:
    """ROC and PR curves for in-memory arrays, in the form of :meth:`StreamingMetrics.curves`.

    Pixel curves are binned over the maps' own score range; at plotting resolution they are
    indistinguishable from the exact ones.
    """
    score_range = None
    if anomaly_maps is not None and masks is not None:
        maps, _ = _validate_maps(anomaly_maps, masks)
        lo, hi = float(maps.min()), float(maps.max())
        score_range = (lo, hi) if hi > lo else (lo, lo + 1.0)
    accumulator = StreamingMetrics(score_range=score_range, num_bins=num_bins)
    accumulator.update(categories, image_scores, image_labels, anomaly_maps, masks)
    return accumulator.curves(max_points=max_points)
