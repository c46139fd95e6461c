"""Frozen timm backbone whose features compare an image with its reconstruction (DiAD Sec. 3.3).

Inputs are images in [-1, 1]; the extractor maps them to the backbone's own normalisation
(ImageNet mean/std). DiAD uses an ImageNet ResNet50. ``pretrained: imagenet`` is the ImageNet
EfficientNet-Lite0 installed with the project (:mod:`anomdiff.models.imagenet`), the default of the
CPU presets; ``null`` builds the network with random weights (unit tests).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import timm
import torch
from torch import nn

from anomdiff.models.config import BackboneConfig


def _random(name: str, kwargs: dict) -> nn.Module:
    """A randomly initialised timm network whose residual branches are live: timm zero-initialises the
    last BatchNorm gain of every ResNet block (``zero_init_last``), which makes each block the
    identity and a random ResNet's layer1-layer3 one random 7x7 convolution and pooling."""
    try:
        return timm.create_model(name, pretrained=False, zero_init_last=False, **kwargs)
    except TypeError as exc:  # architectures without the option (EfficientNet, ViT) have no zeroed gain
        if "zero_init_last" not in str(exc):
            raise
        return timm.create_model(name, pretrained=False, **kwargs)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` or torch file, read as timm reads its checkpoints (EMA
    weights first, ``state_dict``/``model`` wrappers and DataParallel's ``module.`` prefix removed,
    no code run); an unreadable file is an error naming it."""
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True)
    except Exception as exc:  # torch, safetensors and pickle raise many types for a damaged or foreign file
        raise ValueError(f"model.backbone.pretrained: {str(path)!r} is not a readable weights file "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(state, dict):
        raise ValueError(f"model.backbone.pretrained: {str(path)!r} holds no state dict")
    return state


def missing_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """The model's tensors that ``state`` has no entry for (timm's feature wrappers may add a
    ``model.`` prefix; BatchNorm step counters are not weights)."""
    return [k for k in model.state_dict() if not k.endswith("num_batches_tracked")
            and k not in state and k.removeprefix("model.") not in state]


def _require_covered(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    missing = missing_keys(model, state)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"model.backbone.pretrained: {source} does not hold {len(missing)} of the {name} "
                         f"backbone's tensors ({shown}); it is not a timm {name} state dict")


def _create(cfg: BackboneConfig) -> nn.Module:
    kwargs = {"features_only": True, "out_indices": tuple(cfg.layers),
              **({"img_size": cfg.img_size} if cfg.img_size else {})}
    if cfg.pretrained is None:
        return _random(cfg.name, kwargs)
    if cfg.pretrained == "imagenet":
        from anomdiff.models.imagenet import imagenet_state_dict

        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
        state = imagenet_state_dict(cfg.name)
        _require_covered(model, state, cfg.name, "the packaged ImageNet weights")
        wanted = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        model.load_state_dict({k: state[k] for k in wanted}, strict=False)  # all but the step counters: checked above
        return model
    if cfg.pretrained == "hub":
        source, extra = "timm's default weights (hub)", {}
    else:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.backbone.pretrained: weights file {str(path)!r} for {cfg.name!r} does not exist"
            )
        # timm loads some architectures' files non-strictly (EfficientNet under features_only): a file
        # with other key names would leave the network random without a word, so check coverage first.
        _require_covered(timm.create_model(cfg.name, pretrained=False, **kwargs), _read_weights(path),
                         cfg.name, repr(str(path)))
        source, extra = str(path), {"pretrained_cfg_overlay": {"file": str(path)}}
    try:
        return timm.create_model(cfg.name, pretrained=True, **extra, **kwargs)
    except Exception as exc:  # timm raises network, hub and file errors of many types
        raise RuntimeError(
            f"could not load pretrained weights for backbone {cfg.name!r} from {source}: {exc}. Offline, set "
            "model.backbone.pretrained to a local weights file, imagenet (installed EfficientNet-Lite0), "
            "or null for random initialisation."
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
