"""Model selection without the test split: held-out training normals, and the same normals with
synthetic defects pasted in (the generator's anomaly kinds), scored by the model.

The image AUROC on this set picks the best checkpoint; the F1-max threshold on it is the decision
threshold the exported model carries; the normal maps' range calibrates streaming pixel metrics.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from anomdiff import metrics, scoring
from anomdiff.data.synthetic import paste_anomaly_float


def paste_defects(images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image (B x 3 x H x W in [-1, 1]) with one synthetic defect; donors are the batch's
    other images, so a foreign patch comes from another category when the batch has several."""
    rng = np.random.default_rng(seed)
    as_float = ((images.detach().cpu().float().numpy().transpose(0, 2, 3, 1) + 1.0) / 2.0).clip(0, 1)
    defective, masks = np.empty_like(as_float), np.empty(as_float.shape[:3], np.float32)
    for i, image in enumerate(as_float):
        donor = as_float[(i + 1) % len(as_float)] if len(as_float) > 1 else None
        defective[i], mask, _ = paste_anomaly_float(image, rng, donor=donor)
        masks[i] = mask
    out = torch.from_numpy(defective.transpose(0, 3, 1, 2) * 2.0 - 1.0).to(images.device, images.dtype)
    return out, torch.from_numpy(masks).unsqueeze(1).to(images.device)


@torch.no_grad()
def score_validation(model, batches: Iterable[dict], max_images: int | None = None, seed: int = 0) -> dict:
    """Score held-out normals and their defective copies (up to ``max_images`` normals; all of
    ``batches`` when ``None``): one part of the validation set, as arrays :func:`summarise` pools."""
    scores, labels, maps, masks = [], [], [], []
    seen = 0
    for batch_number, batch in enumerate(batches):
        take = len(batch["image"]) if max_images is None else min(len(batch["image"]), max_images - seen)
        if take <= 0:
            break
        normal = {"image": batch["image"][:take], "category_index": batch["category_index"][:take]}
        defective_images, defect_masks = paste_defects(normal["image"], seed + batch_number)
        for images, mask, label in ((normal["image"], torch.zeros_like(defect_masks), 0),
                                    (defective_images, defect_masks, 1)):
            out = model.score({"image": images, "category_index": normal["category_index"]})
            scores.append(out["image_score"].float().cpu().numpy())
            maps.append(out["anomaly_map"].float().cpu().numpy())
            masks.append(mask[:, 0].cpu().numpy())
            labels.append(np.full(take, label))
        seen += take
    if not seen:
        return {"images": 0}
    return {"images": seen, "scores": np.concatenate(scores), "labels": np.concatenate(labels),
            "maps": np.concatenate(maps), "masks": np.concatenate(masks)}


def summarise(parts: list[dict]) -> dict:
    """The validation result of the pooled parts (one per worker): AUROCs, threshold, score range."""
    parts = [p for p in parts if p["images"]]
    if not parts:
        raise ValueError("the validation split is empty: raise data.validation_fraction")
    scores, labels = np.concatenate([p["scores"] for p in parts]), np.concatenate([p["labels"] for p in parts])
    maps, masks = np.concatenate([p["maps"] for p in parts]), np.concatenate([p["masks"] for p in parts])
    # One pooled "category": selection wants one number, and per-category sets are tiny here.
    doc = metrics.compute(np.zeros(len(scores), dtype=int), scores, labels, maps, masks)["mean"]
    return {
        "val_image_auroc": doc["image_auroc"],
        "val_pixel_auroc": doc["pixel_auroc"],
        "val_images": int(sum(p["images"] for p in parts)),
        "threshold": scoring.threshold_from_validation(scores[labels == 0], scores[labels == 1]),
        "score_range": [float(v) for v in metrics.calibrate_score_range(maps[labels == 0])],
    }


def validate(model, batches: Iterable[dict], max_images: int | None, seed: int = 0) -> dict:
    """Score held-out normals and their defective copies in one process; returns AUROCs, threshold,
    score range."""
    return summarise([score_validation(model, batches, max_images, seed)])
