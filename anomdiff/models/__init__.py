"""Model code: one method concept per module, no Ray, no DeepSpeed.

``build_model(cfg, num_categories)`` dispatches on ``cfg.method``; ``load_model(dir)`` on the saved
``config.json``. Implementations are imported on first use, so ``anomdiff.models.config`` stays
cheap to import (no diffusers, no timm).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from anomdiff.models.config import ModelConfig, load_preset

# method name -> "module:Class"; each class takes (cfg, num_categories) and has load(dir).
METHODS: dict[str, str] = {
    "diad": "anomdiff.models.diad:DiADModel",
    "dpdiff": "anomdiff.models.dpdiff:DPDiffModel",
    "drdc": "anomdiff.models.drdc:DRDCModel",
    "knn": "anomdiff.models.knn:KNNModel",
    "proad": "anomdiff.models.proad:ProADModel",
}


def register_method(name: str, target: str) -> None:
    """Make ``cfg.method == name`` build ``target`` ("package.module:Class")."""
    METHODS[name] = target


def model_class(method: str) -> type:
    if method not in METHODS:
        raise ValueError(f"unknown model method {method!r}; available: {', '.join(sorted(METHODS))}")
    module, _, name = METHODS[method].partition(":")
    return getattr(importlib.import_module(module), name)


def build_model(cfg: ModelConfig, num_categories: int):
    """A new model of ``cfg.method`` for ``num_categories`` categories."""
    return model_class(cfg.method)(cfg, num_categories)


def load_model(directory: str | Path, device: str = "cpu"):
    """A model written by ``model.save(directory)``, whatever its method."""
    from anomdiff.models.saved import read_saved_config

    return model_class(read_saved_config(directory)["method"]).load(directory, device=device)


__all__ = ["METHODS", "ModelConfig", "build_model", "load_model", "load_preset", "model_class", "register_method"]
