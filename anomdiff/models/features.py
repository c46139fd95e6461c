"""Frozen timm backbone whose features compare an image with its reconstruction (DiAD Sec. 3.3).

Inputs are images in [-1, 1]; the extractor maps them to the backbone's own normalisation
(ImageNet mean/std for the ResNets). DiAD uses an ImageNet ResNet50; ``pretrained: null`` builds
the same network with random weights (tests, demo, machines without the weights).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import timm
import torch
from torch import nn

from anomdiff.models.config import BackboneConfig


def _create(cfg: BackboneConfig) -> nn.Module:
    kwargs = {"features_only": True, "out_indices": tuple(cfg.layers),
              **({"img_size": cfg.img_size} if cfg.img_size else {})}
    if cfg.pretrained is None:
        return timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.pretrained == "hub":
        source, extra = "timm's default weights (hub)", {}
    else:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.backbone.pretrained: weights file {str(path)!r} for {cfg.name!r} does not exist"
            )
        source, extra = str(path), {"pretrained_cfg_overlay": {"file": str(path)}}
    try:
        return timm.create_model(cfg.name, pretrained=True, **extra, **kwargs)
    except Exception as exc:  # timm raises network, hub and file errors of many types
        raise RuntimeError(
            f"could not load pretrained weights for backbone {cfg.name!r} from {source}: {exc}. Offline, set "
            "model.backbone.pretrained to a local weights file, or to null for random initialisation."
        ) from exc


class FeatureExtractor(nn.Module):
    """timm ``features_only`` backbone, frozen and always in eval mode."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.backbone = _create(cfg)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        data_cfg = self.backbone.pretrained_cfg
        mean = torch.tensor(data_cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(data_cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    @classmethod
    def with_layers(cls, cfg: BackboneConfig, layers: list[int] | None) -> FeatureExtractor:
        """The backbone of ``cfg`` giving a method's own ``layers`` (``None``: the backbone's)."""
        return cls(replace(cfg, layers=list(layers if layers is not None else cfg.layers)))

    @property
    def channels(self) -> list[int]:
        return list(self.backbone.feature_info.channels())

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics stay fixed whatever the owner's mode
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of images in [-1, 1], one per configured layer."""
        return self.differentiable(images)

    def differentiable(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The same feature maps with gradients flowing to ``images`` (the weights stay frozen): for
        losses measured in this feature space."""
        x = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.backbone(x)
