"""One training stage inside a Ray Train worker: the DeepSpeed engine, the batch stream and the
step loop. ``pipelines.train`` runs its VAE and denoiser stages with these, and ``pipelines.bench``
measures exactly these (not a copy of them).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray.train

from anomdiff.config import ExperimentConfig
from anomdiff.data.transforms import unit_range
from pipelines import tracking


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


def training_batches(shard, cfg: ExperimentConfig, device):
    """Endless stream of training batches from this worker's shard (one pass = one epoch), uint8
    pixels brought to [-1, 1] on ``device``."""
    while True:
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=device, drop_last=True,
                                              local_shuffle_buffer_size=cfg.data.shuffle_buffer):
            batch["image"] = unit_range(batch["image"])
            yield batch


def progress(message: str) -> None:
    """A worker's progress line. Ray Train turns a worker's ``print`` into a record of the root logger
    and, when something in the worker has wrapped ``sys.stdout`` (MLflow does), prints it as well:
    with Ray 2.60 every line showed twice. The root logger is the one Ray Train shows (a logger
    named at import time stayed silent: Train configures logging in the worker after the import)."""
    logging.getLogger().info(message)


def run_stage(engine, loss_fn, batches, start: int, steps: int, cfg: ExperimentConfig, label: str,
              on_step=None) -> None:
    """Optimizer steps ``start+1..steps`` of one stage, logging loss, steps/s, images/s and ETA every
    ``train.log_every`` steps (rank 0, and to the active MLflow run); ``on_step(step)`` runs after each."""
    context = ray.train.get_context()
    images_per_step = cfg.train.batch_size * cfg.train.grad_accum * context.get_world_size()
    tick, done = time.perf_counter(), 0
    for step in range(start + 1, steps + 1):
        for _ in range(cfg.train.grad_accum):
            out = loss_fn(next(batches))
            engine.backward(out["loss"])
            engine.step()
        done += 1
        if step % cfg.train.log_every == 0 and context.get_world_rank() == 0:
            seconds = (time.perf_counter() - tick) / done
            eta = time.strftime("%H:%M:%S", time.gmtime(seconds * (steps - step)))
            progress(f"[{label}] step {step}/{steps} loss {out['loss'].item():.4f} | {1 / seconds:.2f} steps/s "
                     f"{images_per_step / seconds:.1f} images/s | ETA {eta}")
            tracking.log_metrics({"loss": out["loss"].item(), "steps_per_s": 1 / seconds,
                                  "images_per_s": images_per_step / seconds}, step)
            tick, done = time.perf_counter(), 0
        if on_step is not None:
            on_step(step)
