"""From features to decisions: anomaly map, smoothing, image score, decision threshold.

DiAD Sec. 3.3: the anomaly map is the sum over backbone layers of ``1 - cos(f_l(x0), f_l(x_rec))``,
each upsampled to the image, then Gaussian smoothed (DiAD: sigma 5 at 256 px). The image score is
the maximum of the map after ``rounds`` of ``kernel x kernel`` stride-1 average pooling (DiAD: 8
rounds of 8 x 8). Everything is batched torch; the threshold helper takes NumPy or torch scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_curve
from torchvision.transforms.v2.functional import gaussian_blur


def feature_distance(
    features_a: list[torch.Tensor], features_b: list[torch.Tensor], size: tuple[int, int]
) -> torch.Tensor:
    """Sum over layers of the upsampled per-position cosine distance; ``B x H x W`` float32."""
    if len(features_a) != len(features_b) or not features_a:
        raise ValueError(f"need matching non-empty feature lists, got {len(features_a)} and {len(features_b)}")
    total = None
    for a, b in zip(features_a, features_b, strict=True):
        distance = 1.0 - F.cosine_similarity(a.float(), b.float(), dim=1)
        distance = F.interpolate(distance[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        total = distance if total is None else total + distance
    return total


def pixel_distance(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-pixel L1 distance averaged over channels, ``B x H x W`` float32."""
    return (images.float() - reconstructions.float()).abs().mean(dim=1)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``B x H x W`` maps, kernel radius 4 sigma (scipy's default truncation),
    shrunk to fit maps smaller than the kernel; ``sigma <= 0`` returns the maps unchanged."""
    if sigma <= 0:
        return maps
    radius = min(int(4 * sigma + 0.5), min(maps.shape[-2:]) - 1)
    if radius < 1:
        return maps
    return gaussian_blur(maps.float()[:, None], kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])[:, 0]


def anomaly_map(
    features_a: list[torch.Tensor], features_b: list[torch.Tensor], size: tuple[int, int], sigma: float
) -> torch.Tensor:
    """DiAD's anomaly map (Sec. 3.3): smoothed feature distance at image resolution, ``B x H x W``."""
    return gaussian_smooth(feature_distance(features_a, features_b, size), sigma)


def image_score(maps: torch.Tensor, rounds: int = 8, kernel: int = 8) -> torch.Tensor:
    """Max of the map after ``rounds`` of stride-1 ``kernel x kernel`` average pooling; ``B``.

    Rounds that would pool a map smaller than the kernel are skipped (small test images)."""
    x = maps.float()[:, None]
    for _ in range(rounds):
        if min(x.shape[-2:]) < kernel:
            break
        x = F.avg_pool2d(x, kernel, stride=1)
    return x.flatten(1).amax(dim=1)


def top_fraction_mean(maps: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Mean of the highest ``fraction`` of each map's pixels (at least one); ``B`` (INP-Former's image score)."""
    flat = maps.float().flatten(1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def _as_numpy(scores) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    return np.asarray(scores, dtype=np.float64).ravel()


def threshold_from_validation(scores_normal, scores_anomalous=None, quantile: float = 0.99) -> float:
    """Decision threshold (score >= threshold means anomalous) chosen on validation data.

    With anomalous validation scores: the threshold that maximises F1 (anomalous = positive).
    Without: the ``quantile`` of the normal scores, i.e. a target false-positive rate of
    ``1 - quantile`` on normal images.
    """
    normal = _as_numpy(scores_normal)
    if normal.size == 0:
        raise ValueError("need at least one normal validation score")
    if scores_anomalous is None or _as_numpy(scores_anomalous).size == 0:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        return float(np.quantile(normal, quantile))
    anomalous = _as_numpy(scores_anomalous)
    labels = np.concatenate([np.zeros_like(normal), np.ones_like(anomalous)])
    precision, recall, thresholds = precision_recall_curve(labels, np.concatenate([normal, anomalous]))
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])
