"""Section 2, ``train_overhead``, and the training part of section 6, ``category_scaling``: one Ray
Train run in which a DeepSpeed ZeRO-0 engine steps against the library's plain loop, then on
batches fed by Ray Data at each category count. Engine and step are the training job's own
(``pipelines.engine.initialize`` with its ``deepspeed_config``, ``pipelines.stage.run_stage``), not copies."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from anomdiff.config import ExperimentConfig
from pipelines.bench.measure import (
    TimedBatches,
    as_torch,
    experiment,
    fit_workers,
    median_step,
    ratio,
    seeded_model,
    torch_threads,
)
from pipelines.bench.sizes import SCALING_CATEGORIES, Sizes


def decoded_batch(path: str, image_size: int, batch_size: int, num_categories: int) -> dict:
    """One decoded training batch as NumPy arrays (the fixed batch both training loops step on)."""
    from anomdiff.data.manifest import read_manifest, shard_paths
    from anomdiff.data.schema import read_shard
    from anomdiff.data.transforms import COLUMNS, DecodeBatch

    manifest = read_manifest(path)
    categories = sorted(manifest["counts"])[:num_categories]
    rows = read_shard(shard_paths(path, manifest, "train", categories)[0], columns=list(COLUMNS))
    decoded = DecodeBatch(image_size, categories)(rows.slice(0, batch_size))
    return {"image": decoded["image"], "category_index": decoded["category_index"]}


# --- inside the Ray Train worker -------------------------------------------------------------


def _deepspeed_step_times(engine, cfg: ExperimentConfig, source, steps: int) -> list[float]:
    """Timestamps of ``steps`` ZeRO steps of ``pipelines.stage.run_stage`` (the training job's step)."""
    from pipelines.stage import run_stage

    engine.train()
    batches = TimedBatches(source)
    run_stage(engine, engine, batches, 0, steps, cfg, "bench")
    return batches.times


def interleaved_step_times(engine, plain_model, cfg: ExperimentConfig, batch: dict, rounds: int,
                           steps: int) -> tuple[list[float], list[float]]:
    """Step times of a DeepSpeed engine's step (``pipelines.stage.run_stage``) and of the library's
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


def train_worker(config: dict) -> dict:
    """Ray Train worker (1 worker, the thread count Ray gives it): one ZeRO-0 engine steps against the
    plain loop on a fixed batch, then fed by Ray Data at each category count (the model has tokens
    for the most categories; what more categories cost the model is measured apart, ``category_cost``).
    Returns its timings (``fit_workers`` hands rank 0's return value to the driver)."""
    import ray.train
    import torch

    from pipelines.engine import initialize
    from pipelines.stage import training_batches

    cfg = ExperimentConfig.from_dict(config["experiment"])
    device = ray.train.torch.get_device()
    out = {"threads": torch.get_num_threads(), "phase_s": {}, "streamed_times": {}}
    tick = time.perf_counter()
    categories = max([config["num_categories"], *config["scaling"]])
    total_steps = (config["rounds"] + 1) * config["steps"] + len(config["scaling"]) * config["scaling_steps"]
    model = seeded_model(cfg, categories)
    model.set_stage("denoiser")
    engine = initialize(model, cfg, cfg.train.lr, 0, total_steps)
    out["deepspeed_steps"], out["plain_steps"] = interleaved_step_times(
        engine, seeded_model(cfg, categories), cfg, as_torch(config["batch"], device), config["rounds"],
        config["steps"])
    out["phase_s"]["fixed_batch"], tick = time.perf_counter() - tick, time.perf_counter()
    for n in config["scaling"]:
        shard = training_batches(ray.train.get_dataset_shard(f"categories_{n}"), cfg, device)
        out["streamed_times"][str(n)] = _deepspeed_step_times(engine, cfg, shard, config["scaling_steps"])
        out["phase_s"][f"streamed_{n}"], tick = time.perf_counter() - tick, time.perf_counter()
    return out


# --- on the driver ---------------------------------------------------------------------------


def plain_step_time(cfg: ExperimentConfig, batch: dict, num_categories: int, steps: int, warmup: int,
                    threads: int) -> float:
    """Median step time of the library's single-process loop (``anomdiff.models.train_loop.fit``:
    AdamW, gradient clipping, constant rate like the DeepSpeed job) at ``threads`` torch threads."""
    from anomdiff.models.train_loop import fit

    timed = TimedBatches(as_torch(batch, "cpu"))
    with torch_threads(threads):
        fit(seeded_model(cfg, num_categories), timed, steps, cfg.train.lr, weight_decay=cfg.train.weight_decay,
            grad_clip=cfg.train.grad_clip, schedule="constant")
    return median_step(timed.times, warmup)


def training_sections(paths: dict[int, Path], sizes: Sizes, storage: Path, image_size: int,
                      streamed: bool = True) -> tuple[dict, dict]:
    """Section 2 and the training part of section 6, in one Ray Train run (1 worker): the ZeRO-0 step
    against the plain loop (``interleaved_step_times``), then, with ``streamed``, steps fed by Ray
    Data at each category count."""
    from anomdiff.config import DataConfig
    from pipelines.data import DataSpec, train_dataset

    smallest = SCALING_CATEGORIES[0]
    cfg = experiment("tiny", f"train.batch_size={sizes.train_batch}", "train.log_every=1000000000",
                     f"model.image_size={image_size}", "train.schedule=constant")
    batch = decoded_batch(str(paths[smallest]), image_size, sizes.train_batch, smallest)
    scaling = list(SCALING_CATEGORIES) if streamed else []
    datasets = {f"categories_{n}": train_dataset(DataSpec.open(DataConfig(path=str(paths[n])), image_size,
                                                               sizes.train_batch))
                for n in scaling}
    config = {"experiment": cfg.to_dict(), "batch": batch, "num_categories": smallest, "rounds": sizes.train_rounds,
              "steps": sizes.train_steps, "scaling": scaling, "scaling_steps": sizes.scaling_steps}
    out = fit_workers(train_worker, config, 1, storage, datasets)
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
