"""Section 3, ``zero_memory``: two Ray Train workers count their bytes (parameters, gradients,
optimizer state) at DeepSpeed ZeRO stages 0-3, each engine built with the training job's config
(``pipelines.engine.initialize``), a stage's extra ZeRO settings merged into its ``zero_optimization``."""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path

import numpy as np

from anomdiff.config import ExperimentConfig
from pipelines.bench.measure import as_torch, experiment, fit_workers, ratio, seeded_model
from pipelines.bench.sizes import Sizes

ZERO_GRADIENT_ATTRS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer")
ZERO_BUFFER_ATTRS = ("ipg_buckets", "ipg_buffer")


def _storage_bytes(tensors, seen: set) -> int:
    """Bytes of the distinct storages behind ``tensors`` not already in ``seen`` (views count once)."""
    import torch

    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _tensors_in(obj, depth: int = 3):
    """Tensors inside nested lists, tuples, dicts and (one level of) plain objects such as buckets."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth - 1)
    elif depth > 0 and isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors_in(value, depth - 1)
    elif depth > 0 and hasattr(obj, "__dict__") and not callable(obj):
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor | list | dict):
                yield from _tensors_in(value, 1)


def zero_footprint(engine) -> dict[str, int]:
    """This rank's bytes, each storage counted once, in this order:

    - ``parameters``: every model parameter this rank holds: the partition ``p.ds_tensor`` at ZeRO-3
      plus whatever stays whole (parameters below DeepSpeed's persistence threshold), the full
      tensors (trainable and frozen) at stages 0-2;
    - ``optimizer_state``: the inner optimizer's state (Adam moments, step) and its own parameters
      where they are not the model's (ZeRO's fp32 master partitions);
    - ``gradients``: ``.grad`` of model and master parameters plus ZeRO's gradient partitions
      (``averaged_gradients``, ``grads_in_partition``, ``grad_partitions_flat_buffer``);
    - ``buffers``: ZeRO's reduction buckets (``ipg_buckets`` / ``ipg_buffer``), reported apart.

    Measure after ``backward`` and before ``step`` so gradients are alive."""
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    module_params = list(engine.module.parameters())
    masters = [p for group in inner.param_groups for p in group["params"]]
    seen: set = set()
    out = {"parameters": _storage_bytes([p.data for p in module_params] + [getattr(p, "ds_tensor", None)
                                                                           for p in module_params], seen)}
    out["optimizer_state"] = _storage_bytes(list(_tensors_in(inner.state, 3)) + [p.data for p in masters], seen)
    grads = [p.grad for p in module_params + masters]
    for name in ZERO_GRADIENT_ATTRS:
        grads += list(_tensors_in(getattr(wrapper, name, None)))
    grads += list(_tensors_in(getattr(wrapper, f"_{type(wrapper).__name__}__param_id_to_grad_partition", None)))
    out["gradients"] = _storage_bytes(grads, seen)
    out["buffers"] = _storage_bytes([t for name in ZERO_BUFFER_ATTRS for t in _tensors_in(getattr(wrapper, name,
                                                                                                   None))], seen)
    out["total"] = out["parameters"] + out["optimizer_state"] + out["gradients"]
    return out


def zero_model_state_bytes(parameters: int, trainable: int, stage: int, ranks: int = 1, bf16: bool = True,
                           offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, float]:
    """Model-state bytes per rank by the ZeRO paper's count (Rajbhandari et al., SC 2020, section 3):
    every weight 2 bytes in bf16 (4 in fp32), a gradient of the same size per trained weight, and
    optimizer state of 12 bytes per trained weight in mixed precision (float32 master copy and Adam's
    two moments; 8 in fp32, where the weight is its own master). Stage 1 splits the optimizer state
    over ``ranks``, stage 2 the gradients too, stage 3 the weights too (frozen ones included).
    Offload (ZeRO-Offload, Ren et al., ATC 2021) moves the optimizer state and the gradients to the
    host, the gradient partition as float32 (4 bytes), and at stage 3 the weights too. Activations and
    DeepSpeed's buffers (reduction buckets, gathered weights) are not model state and not counted."""
    width = 2 if bf16 else 4
    weights = parameters * width / (ranks if stage >= 3 else 1)
    gradients = trainable * width / (ranks if stage >= 2 else 1)
    optimizer = trainable * (12 if bf16 else 8) / (ranks if stage >= 1 else 1)
    device, host = weights + gradients + optimizer, 0.0
    if offload_optimizer and stage >= 1:
        device -= optimizer + gradients
        host += optimizer + trainable * 4 / (ranks if stage >= 2 else 1)
    if offload_params and stage == 3:
        device -= weights
        host += weights
    return {"device": device, "host": host}


def zero_worker(config: dict) -> list[dict] | None:
    """Ray Train worker (2 workers): for each of ``config["stages"]`` (name -> stage and extra ZeRO
    settings), a copy of one seeded model, one full step, then a second forward/backward and the
    byte count before its step; on GPU also the peak allocated. Every rank's counts are gathered;
    rank 0 returns the list (indexed by rank), the others ``None``."""
    import ray.train
    import torch
    import torch.distributed as dist

    from pipelines.engine import initialize

    cfg = ExperimentConfig.from_dict(config["experiment"])
    device = ray.train.torch.get_device()
    batch = as_torch(config["batch"], device)
    pristine = seeded_model(cfg, config["num_categories"])
    per_stage = {}
    for name, (stage, zero_extra) in config["stages"].items():
        tick = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model = copy.deepcopy(pristine).to(device)
        model.set_stage("denoiser")
        engine = initialize(model, cfg, cfg.train.lr, stage, 2, zero_extra)
        for step in range(2):
            engine.backward(engine(batch)["loss"])
            if step == 0:
                engine.step()
        counted = zero_footprint(engine)
        if device.type == "cuda":
            counted["peak_allocated"] = int(torch.cuda.max_memory_allocated(device))
        counted["seconds"] = time.perf_counter() - tick  # set-up and two steps, not a benchmark figure
        per_stage[name] = counted
        del engine, model
        gc.collect()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, per_stage)
    return gathered if ray.train.get_context().get_world_rank() == 0 else None


def zero_section(sizes: Sizes, storage: Path, use_gpu: bool = False, batch_size: int | None = None) -> dict:
    """Section 3: two Ray Train workers count their bytes at ZeRO stages 0-3."""
    cfg = experiment(sizes.zero_preset, *sizes.zero_overrides, f"train.batch_size={batch_size or sizes.zero_batch}",
                     f"train.use_gpu={str(use_gpu).lower()}", "train.schedule=constant")
    b, s = cfg.train.batch_size, cfg.model.image_size
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (b, 3, s, s)).astype(np.float32), "category_index": np.arange(b) % 4}
    # "3_persist_0": ZeRO-3 without DeepSpeed's default of keeping tensors under 1e5 elements whole on
    # every rank (stage3_param_persistence_threshold), to show what that default costs a small model.
    stages = {str(k): (k, {}) for k in range(4)} | {"3_persist_0": (3, {"stage3_param_persistence_threshold": 0})}
    config = {"experiment": cfg.to_dict(), "batch": batch, "stages": stages, "num_categories": 4}
    ranks = fit_workers(zero_worker, config, 2, storage, use_gpu=use_gpu)
    per_stage = {stage: {key: max(rank[stage][key] for rank in ranks) for key in ranks[0][stage]}
                 for stage in ranks[0]}
    model = seeded_model(cfg, 4)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.trainable_parameters())
    return {
        "stage0_bytes": per_stage["0"]["total"], "stage3_bytes": per_stage["3"]["total"],
        "ratio": ratio(per_stage["3"]["total"], per_stage["0"]["total"]), "per_stage": per_stage,
        "ratio_persist_0": ratio(per_stage["3_persist_0"]["total"], per_stage["0"]["total"]),
        "parameters_in_small_tensors": sum(p.numel() for p in model.parameters() if p.numel() < 100_000),
        "workers": 2, "preset": sizes.zero_preset, "overrides": list(sizes.zero_overrides),
        "parameters": params, "trainable_parameters": trainable, "dtype": "bf16" if use_gpu else "fp32",
        "counted": "max over ranks of parameters + gradients + optimizer state (zero_footprint); "
                   "buffers (reduction buckets) apart",
    }
