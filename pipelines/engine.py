"""The DeepSpeed engine of one training stage: its config (ZeRO stage, offload, buckets, precision),
the bf16 cast that comes before it, and ``deepspeed.initialize``. No Ray: ``pipelines.stage`` builds
the engine in a Ray Train worker with these, and the GPU check (``pipelines.bench.gpu``) in a
plain process on a machine that has DeepSpeed but no Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from anomdiff.config import ExperimentConfig


def deepspeed_config(cfg: ExperimentConfig, lr: float, stage: int, steps: int, zero_extra: dict | None = None) -> dict:
    """DeepSpeed config for one engine: AdamW (cosine or constant rate over ``steps``), ZeRO
    ``stage`` (``zero_extra`` merged into ``zero_optimization``), bf16 or fp32 weights as
    ``train.precision`` says (the CPU accelerator has no fp16)."""
    t = cfg.train
    zero: dict = {"stage": stage}
    if t.zero.offload_optimizer and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.zero.offload_params and stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    if t.zero.bucket_elements:
        size = int(t.zero.bucket_elements)
        zero.update({"reduce_bucket_size": size, "allgather_bucket_size": size} if stage < 3 else
                    {"reduce_bucket_size": size, "stage3_prefetch_bucket_size": size,
                     "stage3_max_live_parameters": size, "stage3_max_reuse_distance": size})
    zero.update(zero_extra or {})
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": t.weight_decay}},
        **({"scheduler": {"type": "WarmupCosineLR",
                          "params": {"total_num_steps": steps, "warmup_num_steps": max(1, steps // 10)}}}
           if t.schedule == "cosine" else {}),
        "zero_optimization": zero,
        "bf16": {"enabled": t.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every ``torch.load`` of this process refuses pickled code, DeepSpeed's own included (it
    asks for ``weights_only=False``): PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, with the three plain
    data classes DeepSpeed's checkpoints hold allowed (loss scaler, ZeRO stage, fragment address)."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def initialize(model, cfg: ExperimentConfig, lr: float, stage: int, steps: int, zero_extra: dict | None = None):
    """``deepspeed.initialize`` over the parameters the model's current stage trains."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(),
                                      config=deepspeed_config(cfg, lr, stage, steps, zero_extra))
    if cfg.train.bf16:
        batch_norm_statistics_like_weights(engine.module)
    return engine


class ScoresThroughEngine:
    """A model's ``score`` run by the engine's ``forward`` (``model(batch, score=True)``), for
    validation. Under ZeRO-3 DeepSpeed gathers a partitioned weight that a method reads as an
    attribute (Pro-AD's prototype bank; the output projection of ``nn.MultiheadAttention``) only
    while the engine's forward runs: a bare ``model.score`` finds it empty on every rank."""

    def __init__(self, engine):
        self.engine = engine

    def score(self, batch: dict) -> dict:
        return self.engine(batch, score=True)


def weights_to_bf16(module) -> None:
    """Cast the weights (not the buffers: the latent scale and the normalisers stay float32, as
    DeepSpeed leaves them) to bf16 one tensor at a time, before DeepSpeed holds bf16 copies beside
    the float32 originals: at sd15 size 2.8 GB less per worker while the engine is set up."""
    import torch

    for parameter in module.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)


def batch_norm_statistics_like_weights(module) -> None:
    """A bf16 engine casts parameters, not buffers: BatchNorm layers would hold bf16 weights beside
    float32 running statistics, which the CPU kernel refuses. The statistics follow their weights."""
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.weight is not None:
            for name in ("running_mean", "running_var"):
                statistic = getattr(layer, name)
                if statistic is not None and statistic.dtype != layer.weight.dtype:
                    setattr(layer, name, statistic.to(layer.weight.dtype))
