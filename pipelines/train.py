"""Train any method on any converted dataset with Ray Train + DeepSpeed ZeRO.

On this machine (a local Ray starts by itself):

    python -m pipelines.train --config conf/experiment/demo.yaml data.path=.anomdiff/demo/data output_dir=runs/demo

On a cluster (KubeRay; see cluster/):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.train --config conf/experiment/realiad_sd15.yaml data.path=/data/realiad output_dir=/runs/x

Order of work: config and pre-flight checks (nothing starts on a bad config, a missing dataset, an
output folder holding another run, or more workers than the cluster can place) -> Ray Data
streams -> TorchTrainer whose workers run ``train_worker`` (DeepSpeed engine, optional VAE stage,
denoiser stage, validation + ZeRO-sharded checkpoints every N steps) -> export of the best
checkpoint as one safetensors model in ``output_dir/model/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from anomdiff.atomic import write_json_atomic
from anomdiff.config import ExperimentConfig, load_config, save_config
from anomdiff.data.transforms import unit_range
from pipelines import tracking
from pipelines.data import (
    DataSpec,
    decoded_train_bytes,
    quiet_data_logs,
    train_counts,
    train_dataset,
    validation_dataset,
)

SELECTION_METRIC = "val_image_auroc"
STATE_FILE = "train_state.json"
RESOLVED_CONFIG = "config.yaml"


# --- pre-flight ------------------------------------------------------------------------------


def data_spec(cfg: ExperimentConfig) -> DataSpec:
    d = cfg.data
    return DataSpec(d.path, cfg.model.image_size, d.num_categories, d.category_seed, d.validation_fraction,
                    d.validation_seed, cfg.train.batch_size, d.decode_cpus, d.balanced, d.cache)


def preflight(cfg: ExperimentConfig) -> list[str]:
    """Everything that can be checked before Ray starts; returns the categories to train on."""
    if not cfg.data.path:
        raise ValueError("data.path is not set: pass data.path=<a converted dataset>")
    if not cfg.output_dir:
        raise ValueError("output_dir is not set: pass output_dir=<folder for this run>")
    counts = train_counts(data_spec(cfg))
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"{cfg.data.path}: category {empty[0]} has no training images")
    out = Path(cfg.output_dir)
    saved = out / RESOLVED_CONFIG
    if saved.is_file():
        if saved.read_text() != _config_text(cfg):
            raise FileExistsError(f"{out} holds another run (its {RESOLVED_CONFIG} differs); "
                                  "choose a new output_dir or delete the old run")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an anomdiff run; choose an empty or new output_dir")
    return list(counts)


def _config_text(cfg: ExperimentConfig) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / RESOLVED_CONFIG)
        return (Path(tmp) / RESOLVED_CONFIG).read_text()


def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse a worker count the cluster cannot place, instead of waiting forever, and a training
    cache the object store cannot hold."""
    t = cfg.train
    available = ray.cluster_resources()
    need = {"CPU": t.num_workers * t.cpus_per_worker, "GPU": t.num_workers if t.use_gpu else 0}
    for resource, amount in need.items():
        if amount > available.get(resource, 0):
            raise ValueError(
                f"train.num_workers={t.num_workers} needs {amount:g} {resource} but the cluster has "
                f"{available.get(resource, 0):g}; lower train.num_workers or train.cpus_per_worker")
    if cfg.data.cache:
        need, store = decoded_train_bytes(data_spec(cfg)), available.get("object_store_memory", 0)
        if need > store / 2:
            raise ValueError(f"data.cache=true keeps up to {need / 2**30:.1f} GiB of decoded training images in "
                             f"Ray's object store of {store / 2**30:.1f} GiB (at most half may go to it); "
                             "set data.cache=false to stream from the shards")


# --- inside each Ray Train worker -------------------------------------------------------------


def deepspeed_config(cfg: ExperimentConfig, lr: float, stage: int, steps: int) -> dict:
    """DeepSpeed config for one engine: AdamW (cosine or constant rate over ``steps``), ZeRO
    ``stage``, bf16 on GPU and fp32 on CPU."""
    t = cfg.train
    zero: dict = {"stage": stage}
    if t.zero.offload_optimizer and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.zero.offload_params and stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": t.weight_decay}},
        **({"scheduler": {"type": "WarmupCosineLR",
                          "params": {"total_num_steps": steps, "warmup_num_steps": max(1, steps // 10)}}}
           if t.schedule == "cosine" else {}),
        "zero_optimization": zero,
        "bf16": {"enabled": t.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _batches(shard, cfg: ExperimentConfig, device):
    """Endless stream of training batches from this worker's shard (one pass = one epoch), uint8
    pixels brought to [-1, 1] on ``device``."""
    while True:
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=device, drop_last=True,
                                              local_shuffle_buffer_size=cfg.data.shuffle_buffer):
            batch["image"] = unit_range(batch["image"])
            yield batch


def _progress(message: str) -> None:
    """A worker's progress line. Ray Train turns a worker's ``print`` into a record of the root logger
    and, when something in the worker has wrapped ``sys.stdout``, prints it as well: with Ray 2.60
    every line showed twice. The root logger is the one Ray Train shows (a logger named at import
    time stayed silent: Train configures logging in the worker after the import)."""
    logging.getLogger().info(message)


def _run_stage(engine, loss_fn, batches, start: int, steps: int, cfg: ExperimentConfig, label: str,
               on_step=None) -> None:
    """Optimizer steps ``start..steps`` of one stage, logging loss, steps/s, images/s and ETA;
    ``on_step(step)`` runs after each step."""
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
            _progress(f"[{label}] step {step}/{steps} loss {out['loss'].item():.4f} | {1 / seconds:.2f} steps/s "
                      f"{images_per_step / seconds:.1f} images/s | ETA {eta}")
            if mlflow.active_run():
                mlflow.log_metrics({"loss": out["loss"].item(), "steps_per_s": 1 / seconds,
                                    "images_per_s": images_per_step / seconds}, step)
            tick, done = time.perf_counter(), 0
        if on_step is not None:
            on_step(step)


def _fit_latent_scale(model, images) -> None:
    """After VAE fine-tuning, rescale latents to unit variance (LDM's scale_by_std), averaged over
    ranks so every worker keeps the same model."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        scale = torch.tensor([model.fit_latent_scale(images)], device=images.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(scale)
        scale /= dist.get_world_size()
    model.latent_scale.fill_(scale.item())


@contextmanager
def _stage_run(name: str, enabled: bool):
    """A nested MLflow run for one training stage (rank 0 only), with system metrics."""
    if not enabled:
        yield
        return
    with mlflow.start_run(run_name=name, nested=True, log_system_metrics=True):
        yield


def train_worker(config: dict) -> None:
    """The per-worker training loop (runs on every Ray Train worker)."""
    import deepspeed
    import torch

    from anomdiff.models import build_model
    from anomdiff.validation import validate

    cfg = ExperimentConfig.from_dict(config["experiment"])
    categories, run_id = config["categories"], config["mlflow_run_id"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    tracked = rank == 0 and bool(run_id)
    if tracked:
        mlflow.set_tracking_uri(config["tracking_uri"])
        mlflow.set_experiment(experiment_id=config["mlflow_experiment_id"])  # nested stage runs go there too
        mlflow.start_run(run_id=run_id)

    model = build_model(cfg.model, len(categories)).to(device)
    train_batches = _batches(ray.train.get_dataset_shard("train"), cfg, device)
    validation_shard = ray.train.get_dataset_shard("validation")

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_step = json.loads((Path(directory) / STATE_FILE).read_text())["step"]

    if cfg.train.vae_steps and checkpoint is None:
        # Stage 1 (DiAD Sec. 4.1): fine-tune the autoencoder on normal images. The VAE is small, so
        # this stage runs at most ZeRO-2 and is redone, not resumed, if a worker fails inside it.
        model.set_stage("vae")
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(),
                                          config=deepspeed_config(cfg, cfg.train.vae_lr, min(cfg.train.zero.stage, 2),
                                                                  cfg.train.vae_steps))
        with _stage_run("vae", tracked):
            _run_stage(engine, engine.module.vae_loss, train_batches, 0, cfg.train.vae_steps, cfg, "vae")
        _fit_latent_scale(model, next(train_batches)["image"])

    model.set_stage("denoiser")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(),
                                      config=deepspeed_config(cfg, cfg.train.lr, cfg.train.zero.stage, cfg.train.steps))
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag="ds")

    def validation_batches():
        return validation_shard.iter_torch_batches(batch_size=cfg.evaluate.batch_size, device=device)

    def checkpoint_and_report(step: int) -> None:
        if step % cfg.train.checkpoint_every and step != cfg.train.steps:
            return
        engine.eval()
        result = validate(engine.module, validation_batches(), cfg.train.validation_images, seed=cfg.seed)
        engine.train()
        metrics = {"step": step, **{k: v for k, v in result.items() if k != "score_range"}}
        with tempfile.TemporaryDirectory() as directory:
            engine.save_checkpoint(directory, tag="ds")
            if rank == 0:
                write_json_atomic(Path(directory) / STATE_FILE, {"step": step, **result})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        if rank == 0:
            _progress(f"[validate] step {step}: image AUROC {result['val_image_auroc']:.3f}, "
                      f"pixel AUROC {result['val_pixel_auroc']:.3f} on {result['val_images']} held-out normals "
                      "and their pasted-defect copies")
            if mlflow.active_run():
                mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step)

    engine.train()
    name = f"denoiser (resumed at step {start_step})" if start_step else "denoiser"
    with _stage_run(name, tracked and start_step < cfg.train.steps):
        _run_stage(engine, engine, train_batches, start_step, cfg.train.steps, cfg, "denoiser", checkpoint_and_report)
    if tracked:
        mlflow.end_run()


# --- export ----------------------------------------------------------------------------------


def consolidated_state_dict(checkpoint_dir: Path, zero_stage: int) -> dict:
    """Full fp32 weights from a DeepSpeed checkpoint, whatever the ZeRO stage it was saved with."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if zero_stage == 0:
        states = torch.load(checkpoint_dir / "ds" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        return states["module"]
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="ds")


def export_model(cfg: ExperimentConfig, categories: list[str], checkpoint_dir: Path, out: Path) -> dict:
    """Write the consolidated model (safetensors + config + threshold) to ``out`` atomically."""
    from anomdiff.models import build_model

    state = json.loads((checkpoint_dir / STATE_FILE).read_text())
    model = build_model(cfg.model, len(categories))
    model.load_state_dict(consolidated_state_dict(checkpoint_dir, cfg.train.zero.stage), strict=True)
    metadata = {"categories": categories, "threshold": state["threshold"], "score_range": state["score_range"],
                "step": state["step"], SELECTION_METRIC: state[SELECTION_METRIC],
                "val_pixel_auroc": state["val_pixel_auroc"], "experiment": cfg.name}
    staging = Path(tempfile.mkdtemp(prefix=".model.", dir=out.parent))
    model.save(staging, metadata=metadata)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return metadata


# --- the job ---------------------------------------------------------------------------------


def run(cfg: ExperimentConfig) -> dict:
    """Train and export; returns the exported model's metadata."""
    categories = preflight(cfg)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / RESOLVED_CONFIG)
    ray.init(ignore_reinit_error=True)
    quiet_data_logs()
    check_resources(cfg)

    spec = data_spec(cfg)
    datasets = {"train": train_dataset(spec), "validation": validation_dataset(spec)}
    uri = tracking.use_experiment(cfg)
    run_id_file = out / "mlflow_run_id"
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.name) as active:
        run_id_file.write_text(active.info.run_id)
        if run_id is None:
            tracking.log_config(cfg)
    t = cfg.train
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    keep_best = CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=SELECTION_METRIC,
                                 checkpoint_score_order="max")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"experiment": cfg.to_dict(), "categories": categories,
                           "mlflow_run_id": active.info.run_id, "mlflow_experiment_id": active.info.experiment_id,
                           "tracking_uri": uri},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name="ray", storage_path=str(out), checkpoint_config=keep_best,
                             failure_config=FailureConfig(max_failures=t.max_failures)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    best_checkpoint, _ = max(result.best_checkpoints, key=lambda pair: pair[1][SELECTION_METRIC])
    with best_checkpoint.as_directory() as directory:
        metadata = export_model(cfg, categories, Path(directory), out / "model")
    with mlflow.start_run(run_id=active.info.run_id):
        mlflow.log_metrics({"best/" + SELECTION_METRIC: metadata[SELECTION_METRIC],
                            "best/threshold": metadata["threshold"]})
        mlflow.log_artifact(str(out / "model" / "config.json"), "model")
    print(f"exported the step-{metadata['step']} model ({SELECTION_METRIC} {metadata[SELECTION_METRIC]:.3f}) "
          f"to {out / 'model'}")
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="an experiment YAML (conf/experiment/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    args = parser.parse_args(argv)
    run(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
