"""Benchmark the machine or cluster it runs on: every figure a ratio measured side by side in one run.

On this machine (a local Ray starts by itself; ``--quick`` takes under 5 minutes on 2 cores):

    python -m pipelines.benchmark --quick --json bench.json

On a cluster (the work folder must be storage every node reads, it holds the synthetic shards):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.benchmark --workdir /mnt/shared/bench --json /mnt/shared/bench.json

On a GPU machine without Ray, the GPU section alone (``anomdiff/`` and torch only):

    python -m pipelines.benchmark --sections gpu --json gpu.json

Order of work: synthetic shards at 10, 40 and 160 categories (the same number of training images
each) -> the sections without Ray: ``scoring`` (decode -> score -> streaming metrics, tiny preset,
10 DDIM steps, guidance off against DiAD's doubled guidance), ``metrics`` (streaming against exact,
each mode in a fresh process for its peak memory), ``gpu`` (only where ``torch.cuda.is_available()``,
otherwise ``null``) -> Ray: ``ingest`` (Ray Data decode + resize against a single-process pyarrow +
Pillow loop over the same shards), one Ray Train run for ``train_overhead`` (DeepSpeed ZeRO-0 step,
1 worker, against the library's plain loop on the same model and batch) and the training part of
``category_scaling`` (steps fed by Ray Data at 10/40/160 categories), the scaling ingest, then
``zero_memory`` (per-rank bytes at ZeRO 0-3, 2 workers). Throughputs are the best of ``repeats``
runs and step times medians after warm-up steps: on a shared machine other users only slow a run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from anomdiff.atomic import write_json_atomic
from anomdiff.config import ExperimentConfig, load_config

SECTIONS = ("ingest", "train_overhead", "zero_memory", "scoring", "metrics", "category_scaling", "gpu")
# Run only when named in --sections: each trains every method with the demo's budget (minutes each).
OPTIONAL_SECTIONS = ("methods",)
METHOD_CATEGORIES = 32
SCALING_CATEGORIES = (10, 40, 160)
SCORING_DDIM_STEPS = 10
TARGETS = {"train_overhead_ratio_max": 1.10, "zero_stage3_over_stage0_max": 0.55, "ingest_160_over_10_tolerance": 0.10}

# Dense bf16 tensor-core peaks (TFLOPS, vendor data sheets) by a substring of torch's device name;
# the first match wins, so the more specific names come first. --peak-tflops overrides.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; ``quick`` fits in 5 minutes on 2 cores."""

    train_images: int = 6400  # per scaling dataset, split evenly over its categories
    stored_size: int = 128  # pixels of the synthetic shards; decoding resizes them to the tiny preset's 64
    test_per_category: int = 8  # of the 10-category dataset (scoring reads it)
    ingest_batch: int = 32
    repeats: int = 3
    train_batch: int = 8
    train_rounds: int = 6  # plain and DeepSpeed blocks of train_steps, alternated
    train_steps: int = 8
    warmup_steps: int = 5
    scaling_steps: int = 30
    zero_preset: str = "small"
    # The small preset's layout at half its UNet width (84M parameters: two full-width fp32 ranks
    # with their Adam state do not fit this machine's 24 GB) and 128 px (at 64 px its fourth level
    # would be 1x1, too small for GroupNorm).
    zero_overrides: tuple[str, ...] = ("model.unet.block_out_channels=[64,128,256,256]",
                                       "model.unet.cross_attention_dim=256", "model.image_size=128",
                                       "model.vae.sample_size=128", "model.unet.sample_size=16")
    zero_batch: int = 2
    scoring_images: int = 64
    scoring_batch: int = 8
    metric_maps: int = 10_000
    metric_size: int = 256


QUICK = Sizes(
    train_images=960, stored_size=96, test_per_category=4, repeats=1, train_rounds=3, train_steps=6, warmup_steps=2,
    scaling_steps=6,
    zero_preset="tiny",
    zero_overrides=("model.unet.block_out_channels=[32,128,128]", "model.unet.cross_attention_dim=128",
                    "model.unet.norm_num_groups=16", "model.image_size=32", "model.vae.sample_size=32",
                    "model.unet.sample_size=8"),
    scoring_images=16, metric_maps=200,
)


# --- small pure helpers ----------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b`` is zero."""
    return None if a is None or not b else a / b


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak FLOP/s."""
    if step_seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"step time and peak must be positive, got {step_seconds} s and {peak_flops} FLOP/s")
    return flops_per_step / step_seconds / peak_flops


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its torch device name, ``None`` when not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def median_step(times: list[float], warmup: int) -> float:
    """Median of the intervals between successive timestamps, after ``warmup`` intervals."""
    steps = np.diff(times)[warmup:]
    if steps.size == 0:
        raise ValueError(f"{len(times)} timestamps leave no step after {warmup} warm-up steps")
    return float(np.median(steps))


class TimedBatches:
    """Iterator over ``source`` (one fixed batch forever if given a dict) that records the time of
    every ``next()``: training loops ask for a batch at the start of each step, so the differences
    are step times, whoever runs the loop."""

    def __init__(self, source):
        self.source = itertools.repeat(source) if isinstance(source, dict) else iter(source)
        self.times: list[float] = []

    def __iter__(self):
        return self

    def __next__(self):
        self.times.append(time.perf_counter())
        return next(self.source)


def synthetic_maps(n: int, size: int, seed: int, num_categories: int = 10) -> tuple[np.ndarray, ...]:
    """``n`` anomaly maps with masks (every second image has a disc defect scoring higher):
    categories, image scores, labels, maps ``n x size x size`` float32, masks uint8."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    yy, xx = np.ogrid[:size, :size]
    cy, cx = rng.uniform(0.15, 0.85, (2, n, 1, 1)) * size
    radius = np.maximum(rng.uniform(0.02, 0.12, (n, 1, 1)) * size, 1.0)  # at least one pixel
    masks = (((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & labels[:, None, None].astype(bool)).astype(np.uint8)
    maps = rng.normal(0.3, 0.1, (n, size, size)).astype(np.float32)
    maps += masks * rng.uniform(0.05, 0.6, (n, 1, 1)).astype(np.float32)
    categories = np.array([f"c{i // 2 % num_categories:02d}" for i in range(seed * n, seed * n + n)])
    return categories, maps.reshape(n, -1).max(axis=1), labels, maps, masks


def parse_operator_stats(stats: str) -> dict[str, dict[str, float]]:
    """Tasks and wall seconds per operator from ``Dataset.stats()`` text (evidence for the ingest figures)."""
    found = {}
    for name, tasks, seconds in re.findall(r"Operator \d+ (.+?): (\d+) tasks executed, \d+ blocks produced in "
                                           r"([\d.]+)(?:s)", stats):
        found[name] = {"tasks": int(tasks), "wall_s": float(seconds)}
    return found


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith(
        "model name")), platform.processor())
    info = {"cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": _proc_bytes("/proc/meminfo", "MemTotal"),
            "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "ray_data_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_DATA_")}}
    for package in ("ray", "deepspeed"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _proc_bytes(path: str, field: str) -> int:
    """A ``Field:  N kB`` line of a /proc file in bytes (0 where the file or field is missing)."""
    kb = next((int(line.split()[1]) for line in _read_lines(path) if line.startswith(field + ":")), 0)
    return kb * 1024


def experiment(preset: str = "tiny", *overrides: str) -> ExperimentConfig:
    """The demo's composition (synthetic data, CPU training settings) on the model ``preset``, with
    dotted ``overrides``: the same config path as ``anomdiff train``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump({"compose": {"data": "synthetic", "model": preset, "train": "cpu"},
                                        "name": "bench"}))
        return load_config(path, list(overrides))


def _seeded_model(cfg: ExperimentConfig, num_categories: int):
    import torch

    from anomdiff.models import build_model

    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, num_categories)


# --- data ------------------------------------------------------------------------------------


def make_datasets(root: Path, sizes: Sizes, counts: tuple[int, ...] = SCALING_CATEGORIES,
                  seed: int = 0) -> dict[int, Path]:
    """Synthetic shards at each of ``counts`` categories with the same number of training images each."""
    from anomdiff.data.synthetic import synthesize

    paths = {}
    for n in counts:
        paths[n] = root / f"synthetic-{n}"
        synthesize(paths[n], n, seed=seed, image_size=sizes.stored_size,
                   train_per_category=max(1, sizes.train_images // n),
                   test_per_category=sizes.test_per_category if n == SCALING_CATEGORIES[0] else 2)
    return paths


def baseline_ingest(path: Path, image_size: int, batch_size: int, split: str = "train",
                    validation_fraction: float = 0.1) -> dict:
    """The single-process reference: pyarrow reads the same shard files, the same hold-out filter
    and ``DecodeBatch`` decode and resize them in batches."""
    import pyarrow.parquet as pq

    from anomdiff.data.manifest import read_manifest, shard_paths
    from anomdiff.data.splits import nested_subset
    from anomdiff.data.transforms import COLUMNS, DecodeBatch, SelectHoldout

    manifest = read_manifest(path)
    categories = nested_subset(list(manifest["counts"]), None, 0)  # as DataSpec.categories() orders them
    decode = DecodeBatch(image_size, categories)
    select = SelectHoldout(validation_fraction, 0, validation=False)
    start, images = time.perf_counter(), 0
    for shard in shard_paths(path, manifest, split, categories):
        rows = pq.read_table(shard, columns=list(COLUMNS))
        if split == "train":
            rows = select(rows)
        for offset in range(0, rows.num_rows, batch_size):
            images += len(decode(rows.slice(offset, batch_size))["image"])
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def ray_ingest(path: Path, image_size: int, batch_size: int) -> dict:
    """One pass of ``pipelines.data.train_dataset`` (Ray Data streaming read, hold-out, decode,
    resize) consumed by the driver; with the time to the first batch and ``ds.stats()`` per operator."""
    from pipelines.data import DataSpec, train_dataset

    spec = DataSpec(str(path), image_size, batch_size=batch_size)
    dataset = train_dataset(spec)
    start, first, images = time.perf_counter(), None, 0
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        first = first or time.perf_counter()
        images += len(batch["image"])
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "first_batch_s": (first or start) - start, "operators": parse_operator_stats(dataset.stats())}


def ingest_pair(path: Path, image_size: int, batch_size: int, repeats: int) -> dict:
    """Ray Data and the single-process loop over the same shards, alternated ``repeats`` times; best of each."""
    rays, bases = [], []
    for _ in range(repeats):
        rays.append(ray_ingest(path, image_size, batch_size))
        bases.append(baseline_ingest(path, image_size, batch_size))
    best_ray = max(rays, key=lambda r: r["images_per_s"])
    best_base = max(bases, key=lambda r: r["images_per_s"])
    if best_ray["images"] != best_base["images"]:
        raise RuntimeError(f"{path}: Ray Data gave {best_ray['images']} images, the plain loop {best_base['images']}")
    return {"images": best_ray["images"], "images_per_s": best_ray["images_per_s"],
            "baseline_images_per_s": best_base["images_per_s"], "first_batch_s": best_ray["first_batch_s"],
            "operators": best_ray["operators"], "runs_images_per_s": [r["images_per_s"] for r in rays],
            "baseline_runs_images_per_s": [b["images_per_s"] for b in bases]}


# --- inside Ray Train workers ----------------------------------------------------------------


def _decoded_batch(path: str, image_size: int, batch_size: int, num_categories: int) -> dict:
    """One decoded training batch as NumPy arrays (the fixed batch both training loops step on)."""
    import pyarrow.parquet as pq

    from anomdiff.data.manifest import read_manifest, shard_paths
    from anomdiff.data.transforms import COLUMNS, DecodeBatch

    manifest = read_manifest(path)
    categories = sorted(manifest["counts"])[:num_categories]
    rows = pq.read_table(shard_paths(path, manifest, "train", categories)[0], columns=list(COLUMNS))
    decoded = DecodeBatch(image_size, categories)(rows.slice(0, batch_size))
    return {"image": decoded["image"], "category_index": decoded["category_index"]}


def _as_torch(batch: dict, device) -> dict:
    import torch

    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def _deepspeed_engine(cfg: ExperimentConfig, model, stage: int, steps: int, zero_extra: dict | None = None):
    """``deepspeed.initialize`` with the training job's config (``pipelines.train.deepspeed_config``),
    ``zero_extra`` merged into its ``zero_optimization``."""
    import deepspeed

    from pipelines.train import deepspeed_config

    model.set_stage("denoiser")
    config = deepspeed_config(cfg, cfg.train.lr, stage, steps)
    config["zero_optimization"].update(zero_extra or {})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(), config=config)
    return engine


def _deepspeed_step_times(engine, cfg: ExperimentConfig, source, steps: int) -> list[float]:
    """Timestamps of ``steps`` ZeRO steps of ``pipelines.train._run_stage`` (the training job's step)."""
    from pipelines.train import _run_stage

    engine.train()
    batches = TimedBatches(source)
    _run_stage(engine, engine, batches, 0, steps, cfg, "bench")
    return batches.times


def interleaved_step_times(engine, plain_model, cfg: ExperimentConfig, batch: dict, rounds: int,
                           steps: int) -> tuple[list[float], list[float]]:
    """Step times of a DeepSpeed engine's step (``pipelines.train._run_stage``) and of the library's
    plain loop (``anomdiff.models.train_loop.fit``: AdamW, clipping, constant rate) on a copy of the
    same model, alternating blocks of ``steps`` on the same batch in this process, so that a load
    that comes and goes on the machine falls on both alike. The first round and the first step of
    every block (optimizer set-up) are left out."""
    from anomdiff.models.train_loop import fit

    deepspeed_steps, plain_steps = [], []
    for round_ in range(rounds + 1):
        times = _deepspeed_step_times(engine, cfg, batch, steps)
        if round_:
            deepspeed_steps += np.diff(times)[1:].tolist()
        timed = TimedBatches(batch)
        fit(plain_model, timed, steps, cfg.train.lr, weight_decay=cfg.train.weight_decay,
            grad_clip=cfg.train.grad_clip, schedule="constant")
        if round_:
            plain_steps += np.diff(timed.times)[1:].tolist()
    return deepspeed_steps, plain_steps


def train_worker(config: dict) -> None:
    """Ray Train worker (1 worker, the thread count Ray gives it): one ZeRO-0 engine steps against the
    plain loop on a fixed batch, then fed by Ray Data at each category count (the model has tokens
    for the most categories; what more categories cost the model is measured apart, ``category_cost``)."""
    import ray.train
    import torch

    from pipelines.train import _batches

    cfg = ExperimentConfig.from_dict(config["experiment"])
    device = ray.train.torch.get_device()
    out = {"threads": torch.get_num_threads(), "phase_s": {}, "streamed_times": {}}
    tick = time.perf_counter()
    categories = max([config["num_categories"], *config["scaling"]])
    total_steps = (config["rounds"] + 1) * config["steps"] + len(config["scaling"]) * config["scaling_steps"]
    engine = _deepspeed_engine(cfg, _seeded_model(cfg, categories), stage=0, steps=total_steps)
    out["deepspeed_steps"], out["plain_steps"] = interleaved_step_times(
        engine, _seeded_model(cfg, categories), cfg, _as_torch(config["batch"], device), config["rounds"],
        config["steps"])
    out["phase_s"]["fixed_batch"], tick = time.perf_counter() - tick, time.perf_counter()
    for n in config["scaling"]:
        shard = _batches(ray.train.get_dataset_shard(f"categories_{n}"), cfg, device)
        out["streamed_times"][str(n)] = _deepspeed_step_times(engine, cfg, shard, config["scaling_steps"])
        out["phase_s"][f"streamed_{n}"], tick = time.perf_counter() - tick, time.perf_counter()
    _report(out)


def _report(result) -> None:
    """Hand ``result`` to the driver: Ray Train 2 keeps only metrics that come with a checkpoint, so
    rank 0 attaches a (tiny) one."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "result.json").write_text(json.dumps(result))
        ray.train.report({"result": json.dumps(result)}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


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


ZERO_GRADIENT_ATTRS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer")
ZERO_BUFFER_ATTRS = ("ipg_buckets", "ipg_buffer")


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


def zero_worker(config: dict) -> None:
    """Ray Train worker (2 workers): for each of ``config["stages"]`` (name -> stage and extra ZeRO
    settings), a copy of one seeded model, one full step, then a second forward/backward and the
    byte count before its step; on GPU also the peak allocated."""
    import ray.train
    import torch
    import torch.distributed as dist

    cfg = ExperimentConfig.from_dict(config["experiment"])
    device = ray.train.torch.get_device()
    batch = _as_torch(config["batch"], device)
    pristine = _seeded_model(cfg, config["num_categories"])
    per_stage = {}
    for name, (stage, zero_extra) in config["stages"].items():
        tick = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        engine = _deepspeed_engine(cfg, copy.deepcopy(pristine).to(device), stage, 2, zero_extra)
        for step in range(2):
            engine.backward(engine(batch)["loss"])
            if step == 0:
                engine.step()
        counted = zero_footprint(engine)
        if device.type == "cuda":
            counted["peak_allocated"] = int(torch.cuda.max_memory_allocated(device))
        counted["seconds"] = time.perf_counter() - tick  # set-up and two steps, not a benchmark figure
        per_stage[name] = counted
        del engine
        gc.collect()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, per_stage)
    _report(gathered)


def _fit_workers(worker, config: dict, num_workers: int, storage: Path, datasets: dict | None = None,
                 use_gpu: bool = False):
    """Run ``worker`` on a TorchTrainer; returns what rank 0 reported."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 0.5, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=f"{worker.__name__}-{time.time_ns()}", storage_path=str(storage)),
        datasets=datasets or {}, dataset_config=DataConfig(datasets_to_split="all"))
    return json.loads(trainer.fit().metrics["result"])


# --- sections --------------------------------------------------------------------------------


def ingest_section(paths: dict[int, Path], sizes: Sizes, image_size: int, warm_up: bool = True) -> dict:
    """Section 1 on the 10-category shards (after an unmeasured pass with ``warm_up``)."""
    import ray

    if warm_up:
        ray_ingest(paths[SCALING_CATEGORIES[0]], image_size, sizes.ingest_batch)
    result = ingest_pair(paths[SCALING_CATEGORIES[0]], image_size, sizes.ingest_batch, sizes.repeats)
    cpus = float(ray.cluster_resources().get("CPU", 0))
    result["ratio"] = ratio(result["images_per_s"], result["baseline_images_per_s"])
    result.update(cpus=cpus, ratio_per_cpu=ratio(result["ratio"], cpus))
    return result


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block at ``count`` torch threads (what Ray gives a task or actor with ``count`` CPUs or
    less), then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plain_step_time(cfg: ExperimentConfig, batch: dict, num_categories: int, steps: int, warmup: int,
                    threads: int) -> float:
    """Median step time of the library's single-process loop (``anomdiff.models.train_loop.fit``:
    AdamW, gradient clipping, constant rate like the DeepSpeed job) at ``threads`` torch threads."""
    from anomdiff.models.train_loop import fit

    timed = TimedBatches(_as_torch(batch, "cpu"))
    with torch_threads(threads):
        fit(_seeded_model(cfg, num_categories), timed, steps, cfg.train.lr, weight_decay=cfg.train.weight_decay,
            grad_clip=cfg.train.grad_clip, schedule="constant")
    return median_step(timed.times, warmup)


def training_sections(paths: dict[int, Path], sizes: Sizes, storage: Path, image_size: int,
                      streamed: bool = True) -> tuple[dict, dict]:
    """Section 2 and the training part of section 6, in one Ray Train run (1 worker): the ZeRO-0 step
    against the plain loop (``interleaved_step_times``), then, with ``streamed``, steps fed by Ray
    Data at each category count."""
    from pipelines.data import DataSpec, train_dataset

    smallest = SCALING_CATEGORIES[0]
    cfg = experiment("tiny", f"train.batch_size={sizes.train_batch}", "train.log_every=1000000000",
                     f"model.image_size={image_size}", "train.schedule=constant")
    batch = _decoded_batch(str(paths[smallest]), image_size, sizes.train_batch, smallest)
    scaling = list(SCALING_CATEGORIES) if streamed else []
    datasets = {f"categories_{n}": train_dataset(DataSpec(str(paths[n]), image_size, batch_size=sizes.train_batch))
                for n in scaling}
    config = {"experiment": cfg.to_dict(), "batch": batch, "num_categories": smallest, "rounds": sizes.train_rounds,
              "steps": sizes.train_steps, "scaling": scaling, "scaling_steps": sizes.scaling_steps}
    out = _fit_workers(train_worker, config, 1, storage, datasets)
    ray_step, plain = float(np.median(out["deepspeed_steps"])), float(np.median(out["plain_steps"]))
    overhead = {
        "ratio": ratio(ray_step, plain), "ray_step_s": ray_step, "plain_step_s": plain, "threads": out["threads"],
        "measured_steps": len(out["plain_steps"]), "batch_size": sizes.train_batch, "image_size": image_size,
        "preset": "tiny", "where": "both loops in the Ray Train worker, alternating blocks of "
                                  f"{sizes.train_steps} steps, {sizes.train_rounds} rounds after a warm-up round",
    }
    streamed = {n: median_step(times, min(sizes.warmup_steps, len(times) - 2))
                for n, times in out["streamed_times"].items()}
    return overhead, {"train_step_s": streamed, "train_threads": out["threads"], "worker_phase_s": out["phase_s"]}


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
    ranks = _fit_workers(zero_worker, config, 2, storage, use_gpu=use_gpu)
    per_stage = {stage: {key: max(rank[stage][key] for rank in ranks) for key in ranks[0][stage]}
                 for stage in ranks[0]}
    model = _seeded_model(cfg, 4)
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


def scoring_section(paths: dict[int, Path], sizes: Sizes, workdir: Path) -> dict:
    """Section 4: decode -> ``pipelines.evaluate.Scorer`` -> streaming metrics, guidance off and on, at
    the one torch thread Ray gives a scoring actor (``pipelines.evaluate`` asks 0.5 CPU for each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anomdiff.data.manifest import read_manifest, shard_paths
    from anomdiff.data.transforms import COLUMNS, DecodeBatch
    from anomdiff.metrics import StreamingMetrics
    from pipelines.evaluate import Scorer

    path = paths[SCALING_CATEGORIES[0]]
    manifest = read_manifest(path)
    categories = sorted(manifest["counts"])
    cfg = experiment("tiny", f"model.diffusion.ddim_steps={SCORING_DDIM_STEPS}")
    model_dir = workdir / "scoring-model"
    _seeded_model(cfg, len(categories)).save(model_dir, metadata={"categories": categories})
    rows = pa.concat_tables([pq.read_table(p, columns=list(COLUMNS)) for p in shard_paths(path, manifest, "test")])
    rows = rows.slice(0, sizes.scoring_images + sizes.scoring_batch)  # the first batch warms up
    decode = DecodeBatch(cfg.model.image_size, categories)
    result = {}
    for label, guidance in (("off", False), ("on", True)):
        scorer = Scorer(str(model_dir), {"diffusion": {"guidance": guidance}}, use_gpu=False)
        accumulator = StreamingMetrics(score_range=(0.0, 3.0))
        start, images = None, 0
        with torch_threads(1):
            for offset in range(0, rows.num_rows, sizes.scoring_batch):
                out = scorer(decode(rows.slice(offset, sizes.scoring_batch)))
                names = np.array([categories[i] for i in out["category_index"]])
                accumulator.update(names, out["image_score"], out["label"], out["anomaly_map"], out["mask"])
                if start is None:
                    start = time.perf_counter()
                else:
                    images += len(names)
        result[label] = images / (time.perf_counter() - start)
        print(f"[bench] scoring, guidance {label}: {result[label]:.1f} images/s", flush=True)
    return {"images_per_s": result["off"], "guidance_images_per_s": result["on"],
            "ratio_vs_guidance": ratio(result["off"], result["on"]), "images": sizes.scoring_images,
            "batch_size": sizes.scoring_batch, "preset": "tiny", "image_size": cfg.model.image_size, "threads": 1,
            "ddim_steps": cfg.model.diffusion.ddim_steps, "guidance_scale": cfg.model.diffusion.guidance_scale}


METRIC_CHUNK = 100
EXACT_BYTES_PER_PIXEL = 28  # measured: 1,000 maps of 256 x 256 peak at about 1.8 GB in exact mode


def metrics_run(mode: str, n_maps: int, size: int) -> dict:
    """One mode over ``n_maps`` synthetic maps (in chunks of 100, the same in both modes): seconds
    spent in the metrics code, this process's peak RSS and the RSS before the maps existed."""
    from anomdiff import metrics

    baseline = _status_bytes("VmRSS")
    seconds = 0.0
    if mode == "streaming":
        accumulator = metrics.StreamingMetrics(score_range=(-0.5, 1.5))
        for k, start in enumerate(range(0, n_maps, METRIC_CHUNK)):
            chunk = synthetic_maps(min(METRIC_CHUNK, n_maps - start), size, seed=k)
            tick = time.perf_counter()
            accumulator.update(*chunk)
            seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        doc = accumulator.compute()
    elif mode == "exact":
        chunks = [synthetic_maps(min(METRIC_CHUNK, n_maps - s), size, seed=k)
                  for k, s in enumerate(range(0, n_maps, METRIC_CHUNK))]
        arrays = [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
        del chunks
        tick = time.perf_counter()
        doc = metrics.compute(*arrays)
    else:
        raise ValueError(f"unknown metrics mode {mode!r}; choose streaming or exact")
    seconds += time.perf_counter() - tick
    peak = _status_bytes("VmHWM")
    return {"n_maps": n_maps, "seconds": seconds, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
            "peak_bytes": peak - baseline, "mean": doc["mean"]}


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (``VmRSS`` now, ``VmHWM`` its peak). The
    peak restarts at exec, unlike ``ru_maxrss``, which a child inherits from the parent it forked from."""
    return _proc_bytes("/proc/self/status", field)


def _metrics_in_subprocess(mode: str, n_maps: int, size: int) -> dict:
    code = ("import json, sys; from pipelines.benchmark import metrics_run; "
            f"print(json.dumps(metrics_run({mode!r}, {n_maps}, {size})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"metrics {mode} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def metrics_section(sizes: Sizes) -> dict:
    """Section 5: streaming against exact, each in a fresh process; exact shrinks to fit in memory."""
    size, n = sizes.metric_size, sizes.metric_maps
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    fits = int(0.6 * available / (EXACT_BYTES_PER_PIXEL * size * size)) // METRIC_CHUNK * METRIC_CHUNK
    n_exact = max(METRIC_CHUNK, min(n, fits))
    streaming = _metrics_in_subprocess("streaming", n, size)
    exact = _metrics_in_subprocess("exact", n_exact, size)
    comparable = streaming if n_exact == n else _metrics_in_subprocess("streaming", n_exact, size)
    differences = [abs(comparable["mean"][k] - exact["mean"][k]) for k in exact["mean"]
                   if exact["mean"][k] is not None and comparable["mean"][k] is not None]
    return {
        "n_maps": {"streaming": n, "exact": n_exact}, "size": size,
        "streaming": {k: streaming[k] for k in ("seconds", "peak_bytes", "peak_rss_bytes")},
        "exact": {k: exact[k] for k in ("seconds", "peak_bytes", "peak_rss_bytes")},
        "speedup": ratio(exact["seconds"], comparable["seconds"]),
        "memory_ratio": ratio(exact["peak_bytes"], comparable["peak_bytes"]),
        "max_abs_difference": max(differences) if differences else None,
        "note": None if n_exact == n else f"exact mode limited to {n_exact} maps by available memory; "
                                          f"speedup compares both modes at {n_exact} maps",
    }


def category_cost(batch: dict, sizes: Sizes, threads: int, counts=SCALING_CATEGORIES) -> dict:
    """What grows with the number of categories, per registered method (tiny preset): parameters per
    category (category tokens) and their training bytes (fp32 weight, gradient, two Adam moments: 16
    bytes each); what a method adds over DiAD whatever the count (DPDiff-AD's prototype banks are
    shared by all categories): parameters and the plain loop's step time at the most categories."""
    from anomdiff.models import METHODS

    low, high = counts[0], counts[-1]
    out = {}
    for method in sorted(METHODS):
        cfg = experiment("tiny", f"model.method={method}", f"train.batch_size={sizes.train_batch}",
                         "train.schedule=constant")
        totals = {n: sum(p.numel() for p in _seeded_model(cfg, n).parameters()) for n in (low, high)}
        per_category = (totals[high] - totals[low]) / (high - low)
        out[method] = {"parameters_per_category": per_category, "training_bytes_per_category": 16 * per_category,
                       f"parameters_at_{high}": totals[high],
                       f"plain_step_s_at_{high}": plain_step_time(cfg, batch, high, sizes.scaling_steps,
                                                                 min(sizes.warmup_steps, sizes.scaling_steps - 2),
                                                                 threads)}
    if "diad" in out:
        for row in out.values():
            row["parameters_over_diad"] = row[f"parameters_at_{high}"] - out["diad"][f"parameters_at_{high}"]
            row["step_ratio_over_diad"] = ratio(row[f"plain_step_s_at_{high}"], out["diad"][f"plain_step_s_at_{high}"])
    return out


def _denoiser_steps_per_s(output_dir: Path) -> float | None:
    """Median steps/s the training job logged for its denoiser stage (its nested MLflow run)."""
    import mlflow

    parent = (output_dir / "mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}' "
                                                "and tags.mlflow.runName = 'denoiser'")
    history = [m.value for run in children for m in client.get_metric_history(run.info.run_id, "steps_per_s")]
    return float(np.median(history)) if history else None


def methods_section(work: Path, sizes: Sizes, methods: tuple[str, ...] = ("diad", "dpdiff"),
                    num_categories: int = METHOD_CATEGORIES) -> dict:
    """Every method at the same budget: ``conf/experiment/demo.yaml`` (steps, workers, ZeRO stage,
    seed) with only ``model.method`` changed, trained by ``pipelines.train`` on the same synthetic
    categories and evaluated by ``pipelines.evaluate`` on their test split (the exported model is
    the checkpoint chosen on validation, never on test)."""
    from anomdiff.config import CONF_DIR
    from anomdiff.data.synthetic import synthesize
    from pipelines import evaluate, train

    data = work / "data"
    synthesize(data, num_categories, seed=0, image_size=64)
    out = {"categories": num_categories, "experiment": "demo"}
    for method in methods:
        run_dir = work / method
        cfg = load_config(CONF_DIR / "experiment" / "demo.yaml",
                          [f"data.path={data}", f"output_dir={run_dir}", f"model.method={method}",
                           "tracking.experiment=anomdiff-bench-methods"])
        tick = time.perf_counter()
        train.run(cfg)
        train_s = time.perf_counter() - tick
        doc = evaluate.evaluate(str(run_dir / "model"), str(data), str(run_dir / "evaluation"),
                                ["tracking.experiment=anomdiff-bench-methods"])
        steps_per_s = _denoiser_steps_per_s(run_dir)
        out[method] = {**{k: doc["mean"][k] for k in ("image_auroc", "pixel_auroc", "aupro")},
                       "train_s": train_s, "denoiser_step_s": 1 / steps_per_s if steps_per_s else None,
                       "steps": cfg.train.steps, "vae_steps": cfg.train.vae_steps}
        print(f"[bench] {method}: image AUROC {doc['mean']['image_auroc']:.3f}, pixel AUROC "
              f"{doc['mean']['pixel_auroc']:.3f}, trained in {train_s:.0f} s", flush=True)
    if "diad" in out:
        for method in methods:
            out[method]["step_ratio_over_diad"] = ratio(out[method]["denoiser_step_s"], out["diad"]["denoiser_step_s"])
    return out


# --- GPU (library only: runs without Ray) ------------------------------------------------------


def device_benchmark(quick: bool, device: str = "cuda", preset: str = "sd15", batch_size: int = 12,
                     image_size: int = 256, peak_tflops: float | None = None, steps: int | None = None) -> dict | None:
    """Section 7: training images/s and MFU (FLOPs of one step by ``FlopCounterMode``), peak memory
    of a plain AdamW step, and scoring latency per image at 10 DDIM steps; ``None`` without the device.
    Needs only ``anomdiff/`` and torch; the ZeRO stages are measured by ``zero_section`` on GPUs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from anomdiff.models import load_preset
    from anomdiff.models.config import ModelConfig
    from anomdiff.models.train_loop import fit

    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    peak = peak_tflops * 1e12 if peak_tflops else peak_bf16_flops(name) if cuda else None
    cfg = ModelConfig.from_dict({"image_size": image_size, "diffusion": {"ddim_steps": 10}}, base=load_preset(preset))
    steps = steps or (5 if quick else 20)
    warmup = 2
    torch.manual_seed(0)
    from anomdiff.models import build_model

    model = build_model(cfg, 4).to(device)
    batch = {"image": torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1,
             "category_index": torch.arange(batch_size, device=device) % 4}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timed = TimedBatches(batch)
    fit(model, timed, steps + warmup + 1, lr=1e-5, schedule="constant")
    step_s = median_step(timed.times, warmup)
    peak_memory = int(torch.cuda.max_memory_allocated(device)) if cuda else None

    model.train()
    with FlopCounterMode(display=False) as counter:
        model.training_loss(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()

    model.eval()
    one = {"image": batch["image"][:1], "category_index": batch["category_index"][:1]}
    latencies = []
    for _ in range(3 if quick else 10):
        if cuda:
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        model.score(one)
        if cuda:
            torch.cuda.synchronize(device)
        latencies.append(time.perf_counter() - tick)
    return {
        "device": name, "preset": preset, "batch_size": batch_size, "image_size": image_size,
        "dtype": "bf16 autocast" if cuda and cfg.autocast else "fp32",
        "train_images_per_s": batch_size / step_s, "train_step_s": step_s, "flops_per_step": flops,
        "peak_bf16_flops": peak, "mfu": mfu(flops, step_s, peak) if peak else None,
        "plain_adamw_peak_bytes": peak_memory, "score_latency_s": float(np.median(latencies[1:] or latencies)),
        "ddim_steps": cfg.diffusion.ddim_steps,
    }


# --- the job ---------------------------------------------------------------------------------


def _start_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray on this machine's cores."""
    import ray

    from pipelines.data import quiet_data_logs

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # "local": a new instance even when someone else's `ray start` runs on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    quiet_data_logs()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the sections print their own progress


def _cluster_resources() -> dict:
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def targets(doc: dict) -> dict:
    """Which of the issue's targets this run met (``None`` where the section did not run)."""
    overhead = (doc.get("train_overhead") or {}).get("ratio")
    zero = (doc.get("zero_memory") or {}).get("ratio")
    scaling = (doc.get("category_scaling") or {}).get("ingest_ratio_160_over_10")
    return {
        "train_overhead_ratio_le_1.10": None if overhead is None else overhead <= TARGETS["train_overhead_ratio_max"],
        "zero_stage3_le_0.55_stage0": None if zero is None else zero <= TARGETS["zero_stage3_over_stage0_max"],
        "ingest_160_over_10_within_10pct": None if scaling is None else abs(scaling - 1)
        <= TARGETS["ingest_160_over_10_tolerance"],
    }


def run(quick: bool = False, sections: tuple[str, ...] = SECTIONS, workdir: str | None = None,
        peak_tflops: float | None = None, sizes: Sizes | None = None) -> dict:
    """Run the chosen sections and return the benchmark document (sections not run are ``None``).
    The sections without Ray run first, before Ray's processes share the machine with them."""
    sizes = sizes or (QUICK if quick else Sizes())
    start = time.perf_counter()
    doc: dict = {"quick": quick, "sizes": json.loads(json.dumps(asdict(sizes))), "machine": machine(),
                 **dict.fromkeys(SECTIONS), **{k: None for k in OPTIONAL_SECTIONS if k in sections}}
    wanted = set(sections)
    ray_sections = {"ingest", "train_overhead", "zero_memory", "category_scaling"} & wanted
    with tempfile.TemporaryDirectory(prefix="anomdiff-bench-", dir=workdir) as tmp:
        work = Path(tmp)
        image_size = experiment().model.image_size
        paths = {}
        if (ray_sections - {"zero_memory"}) | ({"scoring"} & wanted):
            counts = SCALING_CATEGORIES if "category_scaling" in wanted else SCALING_CATEGORIES[:1]
            _progress(start, f"synthesizing shards at {', '.join(map(str, counts))} categories")
            paths = make_datasets(work / "data", sizes, counts)
        if "scoring" in wanted:
            _progress(start, "scoring: guidance off and on")
            doc["scoring"] = scoring_section(paths, sizes, work)
        if "metrics" in wanted:
            _progress(start, f"metrics: streaming against exact, {sizes.metric_maps} maps")
            doc["metrics"] = metrics_section(sizes)
        if "gpu" in wanted:
            _progress(start, "GPU: " + ("measuring" if _has_cuda() else "no CUDA device, skipped"))
            doc["gpu"] = device_benchmark(quick, peak_tflops=peak_tflops)
        if ray_sections or "methods" in wanted or (doc["gpu"] and os.environ.get("RAY_ADDRESS")):
            _start_ray()
            doc["machine"]["ray_cluster"] = _cluster_resources()
        if {"train_overhead", "category_scaling"} & wanted:
            _progress(start, "training: Ray Train + DeepSpeed against the plain loop, then fed by Ray Data")
            overhead, scaling_train = training_sections(paths, sizes, work / "ray", image_size,
                                                        streamed="category_scaling" in wanted)
            if "train_overhead" in wanted:
                doc["train_overhead"] = overhead
        if {"ingest", "category_scaling"} & wanted:
            _progress(start, "ingest: Ray Data against the single-process loop")
            # The streamed training has already run Ray Data once; otherwise one pass warms it up.
            doc["ingest"] = ingest_section(paths, sizes, image_size, warm_up="category_scaling" not in wanted)
        if "category_scaling" in wanted:
            _progress(start, "category scaling: ingest at 40 and 160 categories")
            doc["category_scaling"] = scaling_section(paths, sizes, image_size, doc["ingest"], scaling_train)
        if "zero_memory" in wanted:
            _progress(start, f"ZeRO memory: stages 0-3 on 2 workers ({sizes.zero_preset} preset)")
            doc["zero_memory"] = zero_section(sizes, work / "ray")
        if "methods" in wanted:
            _progress(start, f"methods: each trained by the demo experiment on {METHOD_CATEGORIES} categories")
            doc["methods"] = methods_section(work / "methods", sizes)
        if doc["gpu"] and _cluster_resources().get("GPU", 0) >= 2:
            _progress(start, "GPU: ZeRO stages 0-3 at DiAD's batch 12 on 2 GPU workers (sd15 preset)")
            doc["gpu"]["zero_memory"] = zero_section(replace(sizes, zero_preset="sd15", zero_overrides=()),
                                                     work / "ray", use_gpu=True, batch_size=12)
    doc["targets"] = targets(doc)
    doc["wall_s"] = time.perf_counter() - start
    doc["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _progress(start, "done")
    return doc


def scaling_section(paths: dict[int, Path], sizes: Sizes, image_size: int, ingest: dict, train: dict) -> dict:
    """Section 6: ingest at 40 and 160 categories next to section 1's 10, the streamed training
    steps and what each method's parameters and step cost do with the number of categories."""
    scaling = {str(SCALING_CATEGORIES[0]): ingest}
    for n in SCALING_CATEGORIES[1:]:
        scaling[str(n)] = ingest_pair(paths[n], image_size, sizes.ingest_batch, sizes.repeats)
    first, last = str(SCALING_CATEGORIES[0]), str(SCALING_CATEGORIES[-1])
    return {
        "categories": list(SCALING_CATEGORIES), "images": {n: s["images"] for n, s in scaling.items()},
        "ingest_images_per_s": {n: s["images_per_s"] for n, s in scaling.items()},
        "baseline_images_per_s": {n: s["baseline_images_per_s"] for n, s in scaling.items()},
        "first_batch_s": {n: s["first_batch_s"] for n, s in scaling.items()},
        "operators": {n: s["operators"] for n, s in scaling.items()},
        "ingest_ratio_160_over_10": ratio(scaling[last]["images_per_s"], scaling[first]["images_per_s"]),
        "baseline_ratio_160_over_10": ratio(scaling[last]["baseline_images_per_s"],
                                            scaling[first]["baseline_images_per_s"]),
        **train,
        "train_ratio_160_over_10": ratio(train["train_step_s"][last], train["train_step_s"][first]),
        "per_method": category_cost(_decoded_batch(str(paths[SCALING_CATEGORIES[0]]), image_size, sizes.train_batch,
                                                    SCALING_CATEGORIES[0]), sizes, train["train_threads"]),
    }


def _progress(start: float, message: str) -> None:
    print(f"[bench {time.perf_counter() - start:6.1f}s] {message}", flush=True)


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(doc: dict) -> str:
    """The README's Performance table from a benchmark document."""
    rows = [("measure", "figure", "target")]
    if doc.get("ingest"):
        i = doc["ingest"]
        rows.append(("ingest: Ray Data / single process (images/s)",
                     f"{_fmt(i['images_per_s'], '.0f')} / {_fmt(i['baseline_images_per_s'], '.0f')} = "
                     f"{_fmt(i['ratio'])}x, {_fmt(i['ratio_per_cpu'])} per CPU ({i['cpus']:g} CPUs)", ""))
    if doc.get("train_overhead"):
        t = doc["train_overhead"]
        rows.append((f"training step: Ray Train + DeepSpeed ZeRO-0 / plain PyTorch ({t['threads']} thread)",
                     f"{_fmt(t['ray_step_s'], '.3f')} s / {_fmt(t['plain_step_s'], '.3f')} s = {_fmt(t['ratio'])}",
                     "<= 1.10"))
    if doc.get("zero_memory"):
        z = doc["zero_memory"]
        rows.append(("ZeRO-3 / ZeRO-0 bytes per rank (params + grads + optimizer), 2 workers",
                     f"{z['stage3_bytes'] / 2**20:.1f} MiB / {z['stage0_bytes'] / 2**20:.1f} MiB = {_fmt(z['ratio'])}",
                     "<= 0.55"))
    if doc.get("scoring"):
        s = doc["scoring"]
        rows.append(("scoring chain, tiny, 10 DDIM steps: guidance off / on (images/s)",
                     f"{_fmt(s['images_per_s'], '.1f')} / {_fmt(s['guidance_images_per_s'], '.1f')} = "
                     f"{_fmt(s['ratio_vs_guidance'])}x", ""))
    if doc.get("metrics"):
        m = doc["metrics"]
        n, n_exact = m["n_maps"]["streaming"], m["n_maps"]["exact"]
        rows.append((f"metrics at {n_exact:,} maps of {m['size']}x{m['size']}: exact / streaming",
                     f"time {_fmt(m['speedup'], '.1f')}x, peak memory {_fmt(m['memory_ratio'], '.1f')}x "
                     f"(exact {m['exact']['peak_bytes'] / 2**20:.0f} MiB), largest difference "
                     f"{_fmt(m['max_abs_difference'], '.1e')}", ""))
        if n != n_exact:
            rows.append((f"streaming metrics at {n:,} maps", f"{m['streaming']['seconds']:.1f} s, peak "
                         f"{m['streaming']['peak_bytes'] / 2**20:.0f} MiB", ""))
    if doc.get("category_scaling"):
        c = doc["category_scaling"]
        ingest = " / ".join(_fmt(c["ingest_images_per_s"][str(n)], ".0f") for n in c["categories"])
        steps = " / ".join(_fmt(c["train_step_s"][str(n)], ".3f") for n in c["categories"])
        rows.append(("ingest at 10 / 40 / 160 categories (images/s)",
                     f"{ingest} (160/10 = {_fmt(c['ingest_ratio_160_over_10'])})", "160/10 within 1 +- 0.10"))
        rows.append(("training step fed by Ray Data at 10 / 40 / 160 categories (s)",
                     f"{steps} (160/10 = {_fmt(c['train_ratio_160_over_10'])})", ""))
        for method, row in c["per_method"].items():
            extra = row.get("parameters_over_diad")
            if method != "diad" and extra:
                rows.append((f"{method} over diad at 160 categories (prototype banks, shared by all categories)",
                             f"+{extra:,} parameters ({16 * extra / 2**20:.1f} MiB to train), step time "
                             f"x{_fmt(row['step_ratio_over_diad'])}; +{row['parameters_per_category']:.0f} "
                             "parameters per category", ""))
    if doc.get("methods"):
        m = doc["methods"]
        for method in (k for k, v in m.items() if isinstance(v, dict)):
            r = m[method]
            rows.append((f"{method}, demo budget, {m['categories']} categories: image / pixel AUROC, denoiser step",
                         f"{_fmt(r['image_auroc'], '.3f')} / {_fmt(r['pixel_auroc'], '.3f')}, "
                         f"{_fmt(r['denoiser_step_s'], '.2f')} s (x{_fmt(r.get('step_ratio_over_diad'))} diad)", ""))
    if doc.get("gpu"):
        g = doc["gpu"]
        rows.append((f"GPU {g['device']}: {g['preset']} training, batch {g['batch_size']}",
                     f"{_fmt(g['train_images_per_s'], '.1f')} images/s, MFU {_fmt(g['mfu'], '.1%')}", ""))
        rows.append(("GPU scoring latency per 256x256 image, 10 DDIM steps", f"{_fmt(g['score_latency_s'], '.3f')} s",
                     ""))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "| --- | --- | --- |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: under 5 minutes on 2 cores")
    parser.add_argument("--json", dest="json_out", help="write the benchmark document here")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS + OPTIONAL_SECTIONS)} (default: all "
                             f"but {','.join(OPTIONAL_SECTIONS)})")
    parser.add_argument("--workdir", help="where the synthetic shards go (shared storage on a cluster; "
                                          "default: a temporary folder)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS + OPTIONAL_SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS + OPTIONAL_SECTIONS)}")
    doc = run(args.quick, sections, args.workdir, args.peak_tflops)
    print(markdown_table(doc))
    print(json.dumps(doc["targets"]))
    if args.json_out:
        write_json_atomic(args.json_out, doc)
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
