"""PatchCore, the nearest-neighbour floor (``method: knn``): a memory bank, no gradient training.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022, arXiv 2106.08265):
- locally aware patch features (Sec. 3.1): mid-level maps of a frozen backbone, each averaged over
  a ``neighbourhood`` x ``neighbourhood`` window, the deeper maps upsampled to the finest grid,
  concatenated and average-pooled along the channels to at most ``dim``;
- the memory bank is reduced by greedy coreset subsampling (Sec. 3.2, Alg. 1) in a random
  projection to ``projection_dim``: each pick is the feature farthest from those already picked;
- the anomaly map is each test patch's distance to its nearest bank entry (Sec. 3.3, Eq. 6),
  upsampled to the image and smoothed with PatchCore's own Gaussian (``knn.sigma``, not the
  diffusion methods' ``scoring`` section); the image score is the largest patch distance times
  Eq. 7's weight, ``1 - softmax`` of the test patch's distances to its match and the match's
  ``reweight_neighbours`` nearest bank entries: a match in a sparse part of the bank counts more.

The bank is built per training category (a coreset of ``coreset_ratio`` of its patches, at most
``max_per_category`` entries). A test image's category is never given (the unified protocol); with
``knn.bank: all`` (default) the categories' coresets are searched as one bank, with
``nearest_category`` the image first picks the category whose coreset lies nearest to its patches
on average and is scored against that coreset alone. The bank is
bounded by ``num_categories * max_per_category`` entries of ``dim`` floats: 160 categories at the
defaults (2,048 entries of at most 1,024 floats) hold at most 1.3 GB, the tiny preset's 64
channels (efficientnet_lite0 layers 1-2) 84 MB.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomdiff import scoring
from anomdiff.models.config import ModelConfig
from anomdiff.models.features import FeatureExtractor
from anomdiff.models.saved import load_weights, read_saved_config, save_model


def greedy_coreset(features: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``size`` rows of ``features`` (N x D) chosen by PatchCore's greedy coreset
    (Alg. 1): start from a seeded row, then repeatedly add the row farthest from the chosen set,
    distances measured after a seeded Gaussian projection to ``projection_dim`` (Johnson-Lindenstrauss)."""
    n = len(features)
    if size >= n:
        return torch.arange(n, device=features.device)
    if size < 1:
        raise ValueError(f"coreset size must be >= 1, got {size}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = features.float()
    if x.shape[1] > projection_dim:
        projection = torch.randn(x.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = x @ projection.to(x.device)
    chosen = torch.empty(size, dtype=torch.long, device=x.device)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = torch.linalg.vector_norm(x - x[chosen[0]], dim=1)
    for i in range(1, size):
        chosen[i] = torch.argmax(nearest)
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(x - x[chosen[i]], dim=1))
    return chosen


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 16384
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance of every query (M x D) to its nearest bank row (K x D) and that row's index,
    queries and bank both taken in chunks of ``chunk`` rows so memory stays bounded at any size."""
    if len(bank) == 0:
        raise ValueError("the memory bank is empty: build it from training images first (anomdiff train)")
    distances, indices = [], []
    for q in range(0, len(queries), chunk):
        best = best_index = None
        for start in range(0, len(bank), chunk):
            distance, index = torch.cdist(queries[q:q + chunk].float(), bank[start:start + chunk].float()).min(dim=1)
            if best is None:
                best, best_index = distance, index + start
            else:
                closer = distance < best
                best, best_index = torch.where(closer, distance, best), torch.where(closer, index + start, best_index)
        distances.append(best)
        indices.append(best_index)
    return torch.cat(distances), torch.cat(indices)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Distance of every query (M x D) to its nearest bank row (K x D)."""
    return nearest_neighbours(queries, bank, chunk)[0]


def reweighting(query: torch.Tensor, match: int, bank: torch.Tensor, neighbours: int) -> torch.Tensor:
    """PatchCore's Eq. 7 weight of the most anomalous patch ``query`` (D) whose nearest bank row is
    ``match``: ``1 - exp(d(query, m*)) / sum over m in N_b(m*) of exp(d(query, m))``, N_b(m*) being the
    ``neighbours`` bank rows nearest to m* (m* itself among them)."""
    b = min(neighbours, len(bank))
    if b < 2:  # a one-row bank: no neighbourhood to weigh against
        return torch.tensor(1.0, device=query.device)
    support = torch.cdist(bank[match][None].float(), bank.float())[0].topk(b, largest=False).indices
    support = torch.cat([torch.tensor([match], device=support.device), support[support != match][: b - 1]])
    distance = torch.cdist(query[None].float(), bank[support].float())[0]
    return 1.0 - torch.softmax(distance, dim=0)[0]


class KNNModel(nn.Module):
    """PatchCore-style memory bank over a frozen timm backbone. ``batch``: ``image`` B x 3 x H x W
    in [-1, 1]; ``category_index`` is read only while the bank is built (training images)."""

    method = "knn"
    stages = ()  # nothing trains by gradient:
    trained_by_gradient = False  # the training job builds the memory bank instead of running DeepSpeed

    def __init__(self, cfg: ModelConfig, num_categories: int):
        super().__init__()
        if cfg.conditioning != "label_free":
            raise ValueError("model.conditioning: knn searches every category's bank and never reads a category; "
                             "leave it label_free")
        self.cfg, self.num_categories = cfg, num_categories
        k = cfg.knn
        self.features = FeatureExtractor.with_layers(cfg.backbone, k.layers)
        self.dim = min(sum(self.features.channels), k.dim)
        self.register_buffer("memory", torch.zeros(0, self.dim))
        self.register_buffer("memory_category", torch.zeros(0, dtype=torch.long))
        self.metadata: dict = {}

    # --- the training interface: nothing trains by gradient --------------------------------------

    def set_stage(self, stage: str) -> None:
        raise ValueError(f"knn has no training stage ({stage!r}): the training job builds its memory bank")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def parameter_counts(self) -> dict[str, int]:
        """No trained parameters; ``memory`` is the bank's bound in floats for ``num_categories``."""
        bound = self.num_categories * self.cfg.knn.max_per_category * self.dim
        return {"unet": 0, "sg": 0, "vae": 0, "prototypes": 0, "memory": bound, "total": 0}

    # --- features and the bank ----------------------------------------------------------------------

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features (Sec. 3.1), B x D x h x w on the finest chosen layer's grid."""
        maps = self.features(images)
        size = maps[0].shape[-2:]
        p = self.cfg.knn.neighbourhood
        pooled = [F.avg_pool2d(m.float(), p, stride=1, padding=p // 2, count_include_pad=False) for m in maps]
        pooled = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                  for m in pooled]
        x = torch.cat(pooled, dim=1)
        if x.shape[1] > self.dim:  # channel-wise average pooling to dim, as PatchCore reduces its layers
            b, c, h, w = x.shape
            x = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, c), self.dim).view(b, h, w, self.dim)
            x = x.permute(0, 3, 1, 2)
        return x

    def coreset_size(self, n: int) -> int:
        """The bank's entries for a category of ``n`` training patches: ``coreset_ratio`` of them, at
        least one, at most ``max_per_category``."""
        k = self.cfg.knn
        return max(1, min(k.max_per_category, math.ceil(k.coreset_ratio * n)))

    def coreset(self, features: torch.Tensor, size: int) -> torch.Tensor:
        """The ``size`` greedy-coreset rows of ``features`` (N x D); all of them when N <= size."""
        k = self.cfg.knn
        return features[greedy_coreset(features, size, k.projection_dim, k.seed)]

    def build_memory(self, features_by_category: dict[int, torch.Tensor], sizes: dict[int, int] | None = None) -> None:
        """Fill the bank with each category's coreset (Sec. 3.2): ``{category_index: N x D}``, reduced to
        ``sizes[category]`` rows (default: :meth:`coreset_size` of the rows given)."""
        rows, owners = [], []
        for category, features in sorted(features_by_category.items()):
            size = sizes[category] if sizes is not None else self.coreset_size(len(features))
            kept = self.coreset(features.to(self.memory.device), size)
            rows.append(kept)
            owners.append(torch.full((len(kept),), int(category), dtype=torch.long, device=kept.device))
        if not rows:
            raise ValueError("no training features to build the memory bank from")
        self.memory = torch.cat(rows).to(self.memory.dtype)
        self.memory_category = torch.cat(owners)


    # --- inference ------------------------------------------------------------------------------

    @torch.no_grad()
    def nearest_category(self, queries: torch.Tensor) -> torch.Tensor:
        """``B``: for each image's patches (B x P x D), the category whose coreset lies nearest on
        average (``knn.bank: nearest_category``)."""
        categories = torch.unique(self.memory_category)
        mean_distance = torch.stack([
            nearest_distance(queries.reshape(-1, queries.shape[-1]), self.memory[self.memory_category == c],
                             self.cfg.knn.chunk).view(queries.shape[:2]).mean(dim=1)
            for c in categories])
        return categories[mean_distance.argmin(dim=0)]

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``anomaly_map`` B x H x W (nearest-bank distance per patch, Eq. 6, smoothed) and
        ``image_score`` B (the largest patch distance, reweighted by Eq. 7)."""
        images, k = batch["image"], self.cfg.knn
        features = self.patch_features(images)
        b, d, h, w = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(b, h * w, d)
        if k.bank == "all":
            banks = [self.memory] * b
        else:
            banks = [self.memory[self.memory_category == c] for c in self.nearest_category(queries)]
        distances, scores = [], []
        for query, bank in zip(queries, banks, strict=True):
            distance, match = nearest_neighbours(query, bank, k.chunk)
            worst = int(distance.argmax())
            weight = reweighting(query[worst], int(match[worst]), bank, k.reweight_neighbours) \
                if k.reweight_neighbours > 0 else 1.0
            distances.append(distance)
            scores.append(weight * distance[worst])
        patch_map = torch.stack(distances).view(b, 1, h, w)
        maps = F.interpolate(patch_map, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return {"anomaly_map": scoring.gaussian_smooth(maps, k.sigma), "image_score": torch.stack(scores).float()}

    # --- persistence ----------------------------------------------------------------------------

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """``model.safetensors`` (the backbone's weights and the bank) and ``config.json``."""
        return save_model(self, directory, metadata)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> KNNModel:
        directory = Path(directory)
        info = read_saved_config(directory)
        if "reweight_neighbours" not in info["config"].get("knn", {}):
            raise ValueError(f"{directory}: a knn model exported before knn scored as PatchCore does (Eq. 7, its own "
                             "smoothing): its threshold and score range belong to the old score. Build it again "
                             "(anomdiff train with its config, a new output_dir; a memory bank takes minutes)")
        cfg = ModelConfig.from_dict(info["config"])
        model = cls(ModelConfig.from_dict({"backbone": {"pretrained": None}}, base=cfg), info["num_categories"])
        state = load_weights(directory, device, expected=model.state_dict(), resizable=("memory", "memory_category"))
        model.memory = torch.empty_like(state["memory"])
        model.memory_category = torch.empty_like(state["memory_category"])
        model.load_state_dict(state, strict=True)
        model.cfg, model.metadata = cfg, info.get("metadata", {})
        return model.to(device).eval()


class CategoryReservoir:
    """One category's patch features seen so far, bounded: whenever more than twice ``size`` rows are
    held they are reduced to a ``size``-row greedy coreset (a streaming approximation of Alg. 1), so a
    worker's memory stays at ``2 x size`` rows per category however large its shard. ``count`` is
    every row seen, for the category's ``coreset_ratio``."""

    def __init__(self, model: KNNModel):
        self.model, self.size = model, model.cfg.knn.max_per_category
        self.parts: list[torch.Tensor] = []
        self.held = self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        self.parts.append(rows)
        self.held += len(rows)
        self.count += len(rows)
        if self.held > 2 * self.size:
            self.parts = [self.model.coreset(torch.cat(self.parts), self.size)]
            self.held = len(self.parts[0])

    def rows(self) -> torch.Tensor:
        return torch.cat(self.parts)
