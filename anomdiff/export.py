"""Export a model's scoring to ONNX, for deployment without the Python training stack.

A method exports when its scoring is one forward pass: ``knn`` (the backbone, the locally aware
patch features, the nearest-neighbour search against the bank held as a constant, PatchCore's Eq. 7
reweighting and smoothing) and ``proad`` (encoder, prototype decoder, feature distance, smoothing).
The diffusion methods (``diad``, ``dpdiff``, ``drdc``) do not: their score is an iterative DDIM
chain over seeded noise draws, with a scheduler that steps in Python between UNet passes, so no
single graph reproduces it.

The graph takes ``image``: float32 B x 3 x S x S in [-1, 1] (S the model's ``image_size``, RGB) and
returns ``anomaly_map`` (B x S x S) and ``image_score`` (B), as ``model.score`` does. The exported
model's categories, threshold and score range go into the ONNX file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomdiff import scoring

EXPORTABLE = ("knn", "proad")
MATMUL = "use_mm_for_euclid_dist"  # cdist as matrix products at every size: ONNX has no cdist operator


class KNNGraph(nn.Module):
    """PatchCore's scoring (``KNNModel.score`` with ``knn.bank: all``) as one batched graph: every
    patch against the whole bank at once (B x P x K distances), no Python loop over images."""

    def __init__(self, model):
        super().__init__()
        if model.cfg.knn.bank != "all":
            raise ValueError("export: knn exports with model.knn.bank=all only (nearest_category picks a bank "
                             "per image in Python)")
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model, k = self.model, self.model.cfg.knn
        features = model.patch_features(image)
        b, d, h, w = features.shape
        queries = features.flatten(2).transpose(1, 2)                     # B x P x D
        bank = model.memory.float()
        distances = torch.cdist(queries, bank.unsqueeze(0).expand(b, -1, -1), compute_mode=MATMUL)  # B x P x K
        nearest, match = distances.min(dim=2)
        worst_distance, worst = nearest.max(dim=1)                        # the most anomalous patch
        score = worst_distance
        if k.reweight_neighbours > 0 and len(bank) > 1:
            matched = bank[match.gather(1, worst[:, None])[:, 0]]        # m*, B x D
            neighbours = min(k.reweight_neighbours, len(bank))
            support = torch.cdist(matched, bank, compute_mode=MATMUL).topk(neighbours, largest=False).indices
            query = queries[torch.arange(b), worst]                       # B x D
            to_support = torch.linalg.vector_norm(query[:, None] - bank[support], dim=-1)  # B x b
            score = (1.0 - torch.softmax(to_support, dim=1)[:, 0]) * worst_distance
        patch_map = nearest.view(b, 1, h, w)
        maps = F.interpolate(patch_map, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return scoring.gaussian_smooth(maps, k.sigma), score


class ScoreGraph(nn.Module):
    """``model.score`` of a method whose scoring is already one forward pass (``proad``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.score({"image": image})
        return out["anomaly_map"], out["image_score"]


def scoring_graph(model) -> nn.Module:
    """The module ONNX export traces for ``model``; a clear error for methods that do not export."""
    if model.method not in EXPORTABLE:
        raise ValueError(f"export: {model.method} does not export to ONNX: its score is an iterative diffusion "
                         f"chain (DDIM steps over noise draws), not one forward pass; exportable: "
                         f"{', '.join(EXPORTABLE)}")
    return (KNNGraph(model) if model.method == "knn" else ScoreGraph(model)).eval()


def export_onnx(model_dir: str | Path, out: str | Path, batch_size: int = 1, opset: int = 18) -> Path:
    """Write ``model_dir``'s scoring as an ONNX file at ``out`` (atomically); returns ``out``."""
    import onnx

    from anomdiff.atomic import atomic_path
    from anomdiff.models import load_model

    model = load_model(model_dir)
    graph = scoring_graph(model)
    size = model.cfg.image_size
    example = torch.zeros(batch_size, 3, size, size)
    with atomic_path(out) as tmp:
        torch.onnx.export(graph, (example,), str(tmp), input_names=["image"],
                          output_names=["anomaly_map", "image_score"], opset_version=opset, dynamo=True,
                          verbose=False)
        proto = onnx.load(str(tmp))
        meta = {"method": model.method, "image_size": size, "input": "RGB in [-1, 1], B x 3 x S x S",
                **{k: model.metadata.get(k) for k in ("categories", "threshold", "score_range")}}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return Path(out)
