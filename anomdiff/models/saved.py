"""The folder every method saves to and loads from: ``model.safetensors`` (every weight and buffer,
backbone included, so a randomly initialised backbone scores the same after loading) and
``config.json`` (method, category count, model config, metadata such as the threshold)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anomdiff.atomic import atomic_directory

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def save_model(model: torch.nn.Module, directory: str | Path, metadata: dict | None = None,
               parts: tuple[str, ...] = ()) -> Path:
    """Write ``model`` (which has ``method``, ``num_categories``, ``cfg`` and ``metadata``) to
    ``directory``, replacing the folder as a whole and atomically (``anomdiff.atomic``). ``parts``
    names submodules that are models of their own: each is saved in a sub-folder of that name (by its
    own ``save``) and left out of this model's weights."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.startswith(tuple(f"{part}." for part in parts))}
    info = {"method": model.method, "num_categories": model.num_categories, "config": model.cfg.to_dict(),
            "metadata": metadata if metadata is not None else model.metadata}
    with atomic_directory(directory) as staging:  # a reader sees the old model or the new one, whole
        save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(info, indent=2))
        for part in parts:
            getattr(model, part).save(staging / part, metadata={})
    return directory


MAX_CATEGORIES = 100_000
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_saved_config(directory: str | Path) -> dict:
    """The ``config.json`` of a saved model, checked before anything is built from it: a clear error
    naming the file and key when the folder is not a saved model or the file is malformed."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{str(directory)!r} is not a saved anomdiff model: {name} is missing")
    path = directory / CONFIG_FILE
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not (isinstance(info, dict) and isinstance(info.get("config"), dict) and isinstance(info.get("method"), str)):
        raise ValueError(f"{path}: expected an object with method (a name) and config (an object)")
    count = info.get("num_categories")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CATEGORIES:
        raise ValueError(f"{path}: num_categories must be an integer in [1, {MAX_CATEGORIES}], got {count!r}")
    # Models saved before ``model.conditioning`` existed were given a token set per category.
    info["config"].setdefault("conditioning", "category_aware")
    return info


def load_weights(directory: str | Path, device: str | torch.device = "cpu",
                 expected: dict[str, torch.Tensor] | None = None, resizable: tuple[str, ...] = ()
                 ) -> dict[str, torch.Tensor]:
    """The saved tensors. With ``expected`` (the freshly built model's state dict, meta tensors will
    do), every name, shape and dtype is checked from the file's header before any tensor is read;
    ``resizable`` names tensors whose length is the saved model's own (a memory bank)."""
    path = Path(directory) / WEIGHTS_FILE
    if expected is not None:
        try:
            with safe_open(path, framework="pt") as f:
                header = {name: f.get_slice(name) for name in f.keys()}
                found = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in header.items()}
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: does not match its config.json (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})")
        for name, (shape, dtype) in found.items():
            want = expected[name]
            if _DTYPES.get(dtype) != want.dtype:
                raise ValueError(f"{path}: {name} is {dtype}, the model holds {want.dtype}")
            if shape != tuple(want.shape) and not (name in resizable and shape[1:] == tuple(want.shape[1:])):
                raise ValueError(f"{path}: {name} has shape {list(shape)}, the model needs {list(want.shape)}")
    return load_file(path, device=str(device))
