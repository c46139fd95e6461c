"""One training stage inside a Ray Train worker: the batch stream and the step loop over a
DeepSpeed engine (built by ``pipelines.engine``). ``pipelines.train`` runs its VAE and denoiser
stages with these, and ``pipelines.bench`` measures exactly these (not a copy of them).
"""

from __future__ import annotations

import logging
import time

import ray.train

from anomdiff.config import ExperimentConfig
from anomdiff.data.transforms import unit_range
from pipelines import tracking


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
