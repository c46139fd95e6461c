"""Parameter counts of a preset, built on the meta device (no memory, no weights, seconds).

Backs ``anomdiff model params --preset P --method M --json``.
"""

from __future__ import annotations

from accelerate import init_empty_weights

from anomdiff.models import build_model
from anomdiff.models.config import ModelConfig, load_preset


def count_parameters(preset: str, method: str | None = None) -> dict[str, int]:
    """``{"unet", "sg", "vae", "prototypes", ..., "total"}`` for ``conf/model/<preset>.yaml`` and
    ``method`` (default: the preset's own)."""
    base = load_preset(preset)
    cfg = ModelConfig.from_dict(
        {"method": method or base.method, "pretrained": None, "backbone": {"pretrained": None},
         "drdc": {"pretrained": None}}, base=base
    )
    with init_empty_weights():
        model = build_model(cfg, num_categories=1)
    return {key: int(value) for key, value in model.parameter_counts().items()}
