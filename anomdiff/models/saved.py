"""The folder every method saves to and loads from: ``model.safetensors`` (every weight and buffer,
backbone included, so a randomly initialised backbone scores the same after loading) and
``config.json`` (method, category count, model config, metadata such as the threshold)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def save_model(model: torch.nn.Module, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write ``model`` (which has ``method``, ``num_categories``, ``cfg`` and ``metadata``) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    info = {"method": model.method, "num_categories": model.num_categories, "config": model.cfg.to_dict(),
            "metadata": metadata if metadata is not None else model.metadata}
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2))
    return directory


def read_saved_config(directory: str | Path) -> dict:
    """The ``config.json`` of a saved model, with a clear error when the folder is not one."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{str(directory)!r} is not a saved anomdiff model: {name} is missing")
    info = json.loads((directory / CONFIG_FILE).read_text())
    # Models saved before ``model.conditioning`` existed were given a token set per category.
    info.get("config", {}).setdefault("conditioning", "category_aware")
    return info


def load_weights(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / WEIGHTS_FILE, device=str(device))
