"""Scoring images that are not in a dataset: files of any size and mode, one exported model.

An :class:`ImageScorer` loads an exported model folder once and scores RGB arrays of any size: each
is resized to the model's square input the way the datasets were (bicubic), its map is resized back
to the image, and the decision compares the image score with the threshold the training job chose
on its validation split (``score >= threshold``: anomalous). The anomalous region drawn on an
overlay is the map's pixels at or above that same threshold (the image score is a pooled maximum
of the map, so an anomalous image has such pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from anomdiff.data.transforms import unit_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """The image files among ``paths`` and inside the folders among them (recursively, sorted,
    hidden files skipped). A folder with no image, or a path that does not exist, is an error."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not inside:
                raise FileNotFoundError(f"{path}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


@dataclass
class Prediction:
    """One image's result: ``score``, ``decision`` (anomalous or not) and the map at the image's size."""

    score: float
    decision: bool
    anomaly_map: np.ndarray


class ImageScorer:
    """An exported model (``model.save`` folder) ready to score RGB arrays."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from anomdiff.models import load_model

        self.model = load_model(model_dir, device=device)
        self.model.eval()
        self.device = device
        meta = self.model.metadata or {}
        self.categories: list[str] = list(meta.get("categories") or [])
        self.threshold = float(meta["threshold"]) if meta.get("threshold") is not None else None
        self.score_range = tuple(meta.get("score_range") or (0.0, 1.0))
        self.image_size = self.model.cfg.image_size

    def check_category(self, category: str | None) -> int | None:
        """The index of ``category`` among the model's categories; ``None`` when not given. A model
        trained with the category as a condition cannot score without it."""
        if category is None:
            if self.model.cfg.conditioning == "category_aware":
                raise ValueError("this model was trained category-aware (model.conditioning=category_aware): "
                                 f"give the category, one of {', '.join(self.categories)}")
            return None
        if category not in self.categories:
            raise ValueError(f"category {category!r} is not among the model's {len(self.categories)} categories "
                             f"({', '.join(self.categories[:10])}{', ...' if len(self.categories) > 10 else ''})")
        return self.categories.index(category)

    def _inputs(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        resized = [rgb if rgb.shape[:2] == size else
                   np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC)) for rgb in images]
        pixels = np.stack(resized).transpose(0, 3, 1, 2).astype(np.float32)
        return torch.from_numpy(unit_range(pixels)).to(self.device)

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray], category: str | None = None) -> list[Prediction]:
        """Score H x W x 3 uint8 arrays (any sizes) as one batch."""
        index = self.check_category(category)
        batch = {"image": self._inputs(images)}
        if self.model.cfg.conditioning == "category_aware":
            batch["category_index"] = torch.full((len(images),), index, dtype=torch.long, device=self.device)
        out = self.model.score(batch)
        scores = out["image_score"].float().cpu().numpy()
        maps = out["anomaly_map"].float()
        predictions = []
        for i, rgb in enumerate(images):
            full = F.interpolate(maps[i][None, None], size=rgb.shape[:2], mode="bilinear", align_corners=False)
            score = float(scores[i])
            predictions.append(Prediction(score, self.threshold is not None and score >= self.threshold,
                                          full[0, 0].cpu().numpy()))
        return predictions

    def overlay(self, rgb: np.ndarray, prediction: Prediction) -> np.ndarray:
        """Image | heatmap over the image | image with the anomalous region outlined, side by side.
        Colours span the validation score range, so they compare across images."""
        from matplotlib import colormaps

        low, high = self.score_range
        level = np.clip((prediction.anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
        heat = (colormaps["jet"](level)[..., :3] * 255).astype(np.float32)
        blend = (0.5 * rgb.astype(np.float32) + 0.5 * heat).astype(np.uint8)
        outlined = rgb.copy()
        if self.threshold is not None:
            region = prediction.anomaly_map >= self.threshold
            edge = region & ~ndimage.binary_erosion(region, iterations=max(1, min(rgb.shape[:2]) // 128))
            outlined[edge] = (255, 0, 0)
        return np.concatenate([rgb, blend, outlined], axis=1)
