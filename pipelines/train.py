"""Train any method on any converted dataset with Ray Train + DeepSpeed ZeRO.

On this machine (a local Ray starts by itself):

    python -m pipelines.train --config conf/experiment/demo.yaml data.path=.anomdiff/demo/data output_dir=runs/demo

On a cluster (KubeRay; see cluster/):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.train --config conf/experiment/realiad_sd15.yaml data.path=/data/realiad output_dir=/runs/x

Order of work: config and pre-flight checks (nothing starts on a bad config, a missing dataset, an
output folder holding another run, or more workers than the cluster can place) -> Ray Data
streams -> TorchTrainer whose workers run ``train_worker`` (DeepSpeed engine, optional VAE stage,
denoiser stage, validation + ZeRO-sharded checkpoints every N steps), or ``bank_worker`` for a
method that trains nothing by gradient (``knn``: one pass that builds its memory bank, then
validation and one checkpoint) -> export of the best checkpoint as one safetensors model in
``output_dir/model/``.
"""

from __future__ import annotations

import argparse
import errno
import json
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import mlflow
import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from anomdiff.atomic import write_json_atomic
from anomdiff.config import ExperimentConfig, load_config, save_config
from anomdiff.lock import LOCK_FILE, hold_folder
from anomdiff.models import model_class
from anomdiff.models.pretrained import pretrained_problems
from pipelines import autoscaling, checkpoints, registry, runtime, stage, tracking
from pipelines.autoscaling import autoscaler_ceiling
from pipelines.data import DataSpec, EveryRowDataConfig, train_dataset, validation_dataset, validation_ids
from pipelines.engine import ScoresThroughEngine, initialize, weights_only_loads, weights_to_bf16

SELECTION_METRIC = "val_selection"  # train.selection_image_weight's mix of validation image and pixel AUROC


def with_selection(result: dict, image_weight: float) -> dict:
    """A validation result with its selection score (:data:`SELECTION_METRIC`)."""
    pixel = result["val_pixel_auroc"] if result.get("val_pixel_auroc") is not None else result["val_image_auroc"]
    return {**result, SELECTION_METRIC: image_weight * result["val_image_auroc"] + (1 - image_weight) * pixel}
STATE_FILE = checkpoints.STATE_FILE
RAY_RUN = "ray"  # Ray Train's run folder in output_dir: one folder per checkpoint
RESOLVED_CONFIG = "config.yaml"
PLACEMENT_GROUP = "placement_group"
PLACEMENT_GROUP_FILE = "placement_group.id"  # the workers' placement group, written by rank 0 as it starts
WORKER_PEAK_RSS = "worker_peak_rss_mb"
LOGGED_MODEL = "mlflow_model.json"  # where the run's model went in MLflow: a finished run is not logged twice


# --- pre-flight ------------------------------------------------------------------------------


def preflight(cfg: ExperimentConfig) -> DataSpec:
    """Everything that can be checked before Ray starts; returns the job's view of the dataset (its
    manifest is read here, once, for the whole job)."""
    if not cfg.data.path:
        raise ValueError("data.path is not set: pass data.path=<a converted dataset>")
    if not cfg.output_dir:
        raise ValueError("output_dir is not set: pass output_dir=<folder for this run>")
    tracking.check_server(cfg.tracking)
    weights = pretrained_problems(cfg.model, getattr(model_class(cfg.model.method), "loads_diffusion_weights", False))
    if weights:
        raise ValueError("; ".join(weights))
    spec = DataSpec.open(cfg.data, cfg.model.image_size, cfg.train.batch_size)
    empty = [c for c, n in spec.train_counts().items() if n == 0]
    if empty:
        raise ValueError(f"{cfg.data.path}: category {empty[0]} has no training images")
    out = Path(cfg.output_dir)
    saved = out / RESOLVED_CONFIG
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file; choose a folder for this run")
    if saved.is_file():
        if saved.read_text() != _config_text(cfg):
            raise FileExistsError(f"{out} holds another run (its {RESOLVED_CONFIG} differs); "
                                  "choose a new output_dir or delete the old run")
    elif out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an anomdiff run; choose an empty or new output_dir")
    return spec


def _config_text(cfg: ExperimentConfig) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / RESOLVED_CONFIG)
        return (Path(tmp) / RESOLVED_CONFIG).read_text()


def check_resources(cfg: ExperimentConfig, spec: DataSpec, ask=lambda bundles: None) -> None:
    """Refuse a worker count the cluster cannot place, instead of waiting forever, and a training
    cache the object store cannot hold. Where an autoscaler can add the workers (within its node
    groups' ceiling, ``train.resource_wait_s > 0``), ``ask(bundles)`` asks it for them and the wait
    is bounded by ``train.resource_wait_s``."""
    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker, "GPU": t.num_workers if t.use_gpu else 0}

    def shortfall() -> tuple[str, float, float] | None:
        available = ray.cluster_resources()
        return next(((r, n, available.get(r, 0)) for r, n in need.items() if n > available.get(r, 0)), None)

    short = shortfall()
    ceiling = autoscaler_ceiling() if short and t.resource_wait_s > 0 else None
    beyond = next(((r, n, ceiling.get(r, 0)) for r, n in need.items() if n > ceiling.get(r, 0)), None) \
        if ceiling else None
    if beyond:  # more than the autoscaler may ever add: no point in waiting
        raise ValueError(f"train.num_workers={t.num_workers} needs {beyond[1]:g} {beyond[0]} but the autoscaler's node "
                         f"groups hold at most {beyond[2]:g} at their maximum size; lower train.num_workers or "
                         "train.cpus_per_worker, or raise the node groups' maxReplicas")
    if short and t.resource_wait_s > 0:  # an autoscaling cluster adds nodes when asked
        ask(worker_bundles(cfg))
        stage.progress(f"[train] {short[1]:g} {short[0]} needed, {short[2]:g} in the cluster: asked the autoscaler "
                       f"for them, waiting up to {t.resource_wait_s:g} s (train.resource_wait_s)")
        deadline = time.monotonic() + t.resource_wait_s
        while short and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            short = shortfall()
    if short:
        waited = f" after {t.resource_wait_s:g} s of waiting for the autoscaler" if t.resource_wait_s else ""
        raise ValueError(
            f"train.num_workers={t.num_workers} needs {short[1]:g} {short[0]} but the cluster has {short[2]:g}"
            f"{waited}; lower train.num_workers or train.cpus_per_worker"
            + ("" if t.resource_wait_s else ", or let an autoscaler add nodes (train.resource_wait_s)"))
    available = ray.cluster_resources()
    if cfg.data.cache:
        need, store = spec.decoded_train_bytes(), available.get("object_store_memory", 0)
        if need > store / 2:
            raise ValueError(f"data.cache=true keeps up to {need / 2**30:.1f} GiB of decoded training images in "
                             f"Ray's object store of {store / 2**30:.1f} GiB (at most half may go to it); "
                             "set data.cache=false to stream from the shards")


# --- inside each Ray Train worker -------------------------------------------------------------


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
    with tracking.run_while_reachable(run_name=name, nested=True, log_system_metrics=True):
        yield


def train_worker(config: dict) -> None:
    """The per-worker training loop (runs on every Ray Train worker)."""
    import torch

    from anomdiff.models import build_model
    from anomdiff.validation import score_validation

    cfg = ExperimentConfig.from_dict(config["experiment"])
    categories = config["categories"]
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    tracked = rank == 0
    if tracked:
        _record_placement_group(config["storage"])
    runs = ExitStack()
    if tracked:
        runs.enter_context(tracking.resume(config["mlflow"]))

    model = build_model(cfg.model, len(categories)).to(device)
    if cfg.train.bf16:
        weights_to_bf16(model)
    train_batches = stage.training_batches(ray.train.get_dataset_shard("train"), cfg, device)
    validation_shard = ray.train.get_dataset_shard("validation")

    checkpoint = _resume_point(rank, config["storage"])
    start_step = checkpoints.step_of(checkpoint) if checkpoint is not None else 0

    if cfg.train.vae_steps and "vae" in model.stages and checkpoint is None:
        # Stage 1 (DiAD Sec. 4.1): fine-tune the autoencoder on normal images. The VAE is small, so
        # this stage runs at most ZeRO-2 and is redone, not resumed, if a worker fails inside it.
        model.set_stage("vae")
        engine = initialize(model, cfg, cfg.train.vae_lr, min(cfg.train.zero.stage, 2), cfg.train.vae_steps)
        with _stage_run("vae", tracked):
            stage.run_stage(engine, engine.module.vae_loss, train_batches, 0, cfg.train.vae_steps, cfg, "vae")
        if cfg.model.refits_latent_scale:
            _fit_latent_scale(model, next(train_batches)["image"])

    model.set_stage("denoiser")
    engine = initialize(model, cfg, cfg.train.lr, cfg.train.zero.stage, cfg.train.steps)
    if checkpoint is not None:
        with weights_only_loads():
            engine.load_checkpoint(str(checkpoint), tag="ds")
        if rank == 0:
            stage.progress(f"[train] resumed from the step-{start_step} checkpoint")

    def validation_batches():
        return validation_shard.iter_torch_batches(batch_size=cfg.evaluate.batch_size, device=device)

    def checkpoint_and_report(step: int) -> None:
        if step % cfg.train.checkpoint_every and step != cfg.train.steps:
            return
        engine.eval()
        # Each rank scores its own share of the validation set; rank 0 pools the shares.
        part = score_validation(ScoresThroughEngine(engine), validation_batches(), seed=cfg.seed + 100_003 * rank)
        result = with_selection(_pooled_validation(part, rank), cfg.train.selection_image_weight)
        engine.train()
        metrics = {"step": step, **{k: v for k, v in result.items() if k != "score_range"}, **_placement()}
        with tempfile.TemporaryDirectory() as directory, _stopping_on_a_full_disk(directory, config["storage"]):
            engine.save_checkpoint(directory, tag="ds")
            if rank == 0:
                ranks = ray.train.get_context().get_world_size()
                write_json_atomic(Path(directory) / STATE_FILE,
                                  {"step": step, **result, **_peak_rss(), "sealed_ranks": ranks})
            checkpoints.seal(directory, rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        if rank == 0:
            _report_validation(step, result)

    engine.train()
    name = f"denoiser (resumed at step {start_step})" if start_step else "denoiser"
    with _stage_run(name, tracked and start_step < cfg.train.steps):
        stage.run_stage(engine, engine, train_batches, start_step, cfg.train.steps, cfg, "denoiser",
                        checkpoint_and_report)
    runs.close()


def _resume_point(rank: int, storage: str) -> Path | None:
    """The checkpoint this run resumes from: Ray Train's latest when it is whole, else the newest
    whole one in the run's folder (:mod:`pipelines.checkpoints`); rank 0 chooses, every rank follows."""
    import torch.distributed as dist

    choice = [None]
    if rank == 0:
        latest = ray.train.get_checkpoint()  # its folder itself: the run's storage is a local or mounted path
        run = Path(storage) / RAY_RUN
        chosen = checkpoints.newest_whole(run, latest.path if latest else None, say=stage.progress)
        if chosen is None and (latest is not None or checkpoints.saved_in(run)):
            choice = [f"no whole checkpoint in {run}; move that folder aside to train from the start"]
        else:
            choice = [str(chosen) if chosen else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is not None and not Path(choice[0]).is_dir():
        raise checkpoints.DamagedCheckpoints(choice[0])
    return Path(choice[0]) if choice[0] else None


@contextmanager
def _stopping_on_a_full_disk(staging: str, storage: str):
    """A checkpoint write that runs out of space (in the staging folder or the run's storage) ends
    as one ``ENOSPC`` naming where; the previous checkpoint, in a folder of its own, is untouched."""
    try:
        yield
    except Exception as exc:
        where = checkpoints.full_disk(exc, [staging, storage])
        if where is None:
            raise
        raise OSError(errno.ENOSPC, "no space left on the device while writing a checkpoint", where) from exc


def bank_worker(config: dict) -> None:
    """The per-worker job of a method that trains nothing by gradient (``knn``). One pass over this
    worker's shard feeds a bounded reservoir per category (``CategoryReservoir``: reduced by greedy
    coreset as it fills); rank 0 gathers every rank's reservoirs and patch counts, keeps
    ``coreset_size(total patches)`` rows per category (``KNNModel.build_memory``), validates the
    bank and checkpoints it like a trained model. A finished run's checkpoint is kept as it is."""
    import torch
    import torch.distributed as dist

    from anomdiff.data.transforms import unit_range
    from anomdiff.models import build_model
    from anomdiff.models.knn import CategoryReservoir
    from anomdiff.validation import validate

    if ray.train.get_checkpoint() is not None:
        return
    cfg = ExperimentConfig.from_dict(config["experiment"])
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        _record_placement_group(config["storage"])
    device = ray.train.torch.get_device()
    model = build_model(cfg.model, len(config["categories"])).to(device).eval()
    reservoirs: dict[int, CategoryReservoir] = {}
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=cfg.train.batch_size,
                                                                         device=device):
        rows = model.patch_features(unit_range(batch["image"])).permute(0, 2, 3, 1)
        for category in batch["category_index"].unique().tolist():
            reservoir = reservoirs.setdefault(category, CategoryReservoir(model))
            reservoir.add(rows[batch["category_index"] == category].flatten(0, 2))
    local = {c: (r.count, r.rows().cpu()) for c, r in reservoirs.items()}
    distributed = dist.is_available() and dist.is_initialized()
    gathered = [None] * dist.get_world_size() if distributed and rank == 0 else [local]
    if distributed:
        dist.gather_object(local, gathered if rank == 0 else None, dst=0)

    shared = [None]  # rank 0's validation metrics, so every rank reports the same
    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:
            counts: dict[int, int] = {}
            parts: dict[int, list] = {}
            for part in gathered:
                for category, (count, rows) in part.items():
                    counts[category] = counts.get(category, 0) + count
                    parts.setdefault(category, []).append(rows)
            model.build_memory({c: torch.cat(p) for c, p in parts.items()},
                               {c: model.coreset_size(n) for c, n in counts.items()})
            stage.progress(f"[memory bank] {len(model.memory)} of {sum(counts.values())} patch features, "
                           f"{len(counts)} categories")
            validation = ray.train.get_dataset_shard("validation").iter_torch_batches(
                batch_size=cfg.evaluate.batch_size, device=device)
            result = with_selection(validate(model, validation, max_images=None, seed=cfg.seed),  # the set is chosen
                                    cfg.train.selection_image_weight)
            model.save(Path(directory) / "model")
            write_json_atomic(Path(directory) / STATE_FILE, {"step": 0, **result, **_peak_rss(), "sealed_ranks": 1})
            checkpoints.seal(directory, 0)
            shared = [{"step": 0, **{k: v for k, v in result.items() if k != "score_range"}, **_placement()}]
            _report_validation(0, result, config["mlflow"])
        if distributed:
            dist.broadcast_object_list(shared, src=0)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report(shared[0], checkpoint=checkpoint)


def _peak_rss() -> dict[str, float]:
    """This worker process's peak resident memory so far (rank 0's, saved with each checkpoint and
    exported with the model: what ``anomdiff scale`` reports as peak memory per worker)."""
    import resource

    return {WORKER_PEAK_RSS: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def _placement() -> dict[str, str]:
    """The worker group's placement group, reported with the metrics: a search that stops this run
    early releases it by this id (ray-project/ray#54305 leaves it reserved otherwise)."""
    group = ray.util.get_current_placement_group()
    return {PLACEMENT_GROUP: group.id.hex()} if group is not None else {}


def _record_placement_group(folder: str) -> None:
    """Write the worker group's placement group id to ``folder/placement_group.id`` as the workers
    start: a search that stops this run before its first report still finds the group to release."""
    from anomdiff.atomic import write_text_atomic

    group = ray.util.get_current_placement_group()
    if group is not None:
        write_text_atomic(Path(folder) / PLACEMENT_GROUP_FILE, group.id.hex())


def _pooled_validation(part: dict, rank: int) -> dict:
    """The validation result of every rank's part: gathered on rank 0, summarised there, the result
    sent back to every rank (all of them report the same metrics to Ray Train)."""
    import torch.distributed as dist

    from anomdiff.validation import summarise

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return summarise([part])
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    shared = [None]
    if rank == 0:
        try:
            shared = [summarise(parts)]
        except ValueError as exc:  # every rank must leave the collective, then fail alike
            shared = [str(exc)]
    dist.broadcast_object_list(shared, src=0)
    if isinstance(shared[0], str):
        raise ValueError(shared[0])
    return shared[0]


def _report_validation(step: int, result: dict, run: dict | None = None) -> None:
    """Rank 0's validation line, and its metrics in the job's MLflow run (the active one, or ``run``)."""
    stage.progress(f"[validate] step {step}: image AUROC {result['val_image_auroc']:.3f}, pixel AUROC "
                   f"{result['val_pixel_auroc']:.3f} on {result['val_images']} held-out normals and their "
                   "pasted-defect copies")
    metrics = {k: v for k, v in result.items() if isinstance(v, int | float)}
    if mlflow.active_run():
        tracking.log_metrics(metrics, step)
    elif run is not None:
        with tracking.resume(run):
            tracking.log_metrics(metrics, step)


# --- export ----------------------------------------------------------------------------------


def consolidated_state_dict(checkpoint_dir: Path, zero_stage: int) -> dict:
    """Full fp32 weights from a DeepSpeed checkpoint, whatever the ZeRO stage it was saved with; no
    load can run code planted in the checkpoint (:func:`pipelines.engine.weights_only_loads`)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        if zero_stage == 0:
            return torch.load(checkpoint_dir / "ds" / "mp_rank_00_model_states.pt", map_location="cpu",
                              weights_only=True)["module"]
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="ds")


def export_model(cfg: ExperimentConfig, categories: list[str], checkpoint_dir: Path, out: Path,
                 validation_counts: dict[str, int] | None = None) -> dict:
    """Write the consolidated model (safetensors + config + threshold) to ``out`` atomically;
    ``validation_counts``: the validation normals per category its checkpoint was chosen on."""
    from anomdiff.models import build_model, load_model

    state = json.loads((checkpoint_dir / STATE_FILE).read_text())
    if (checkpoint_dir / "model").is_dir():  # a training-free method's checkpoint is the model itself
        model = load_model(checkpoint_dir / "model")
    else:
        model = build_model(cfg.model, len(categories))
        model.load_state_dict(consolidated_state_dict(checkpoint_dir, cfg.train.zero.stage), strict=True)
    metadata = {"categories": categories, "threshold": state["threshold"], "score_range": state["score_range"],
                "step": state["step"], SELECTION_METRIC: state[SELECTION_METRIC],
                "val_image_auroc": state["val_image_auroc"], "val_pixel_auroc": state["val_pixel_auroc"],
                "selection_image_weight": cfg.train.selection_image_weight, "val_images": state.get("val_images"),
                "val_images_per_category": validation_counts,
                "experiment": cfg.name, WORKER_PEAK_RSS: state.get(WORKER_PEAK_RSS)}
    model.save(out, metadata=metadata)  # atomic: the previous model stays whole until the new one is in
    return metadata


# --- the job ---------------------------------------------------------------------------------


def run(cfg: ExperimentConfig, address: str | None = None, callbacks: list | None = None) -> dict:
    """Train and export on the Ray that ``address`` names (``pipelines.runtime.start_ray``); returns
    the exported model's metadata. ``callbacks``: Ray Train callbacks (a search's reporter)."""
    spec = preflight(cfg)
    out = Path(cfg.output_dir).resolve()
    # One live training per output_dir: a second one is refused, naming this one. An autoscaler asked
    # for the workers keeps the request until the job ends, however it ends.
    with hold_folder(out), ExitStack() as job:
        runtime.start_ray(address)
        check_resources(cfg, spec, ask=lambda bundles: job.enter_context(autoscaling.holding(bundles)))
        return _train(cfg, spec, out, callbacks)


def worker_bundles(cfg: ExperimentConfig) -> list[dict]:
    """The resources of each Ray Train worker, one bundle per worker."""
    t = cfg.train
    return [{"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}] * t.num_workers


def _train(cfg: ExperimentConfig, spec: DataSpec, out: Path, callbacks: list | None) -> dict:
    categories = spec.categories
    validation = validation_ids(spec, cfg.train.validation_images)  # read once: the dataset and the export's counts
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / RESOLVED_CONFIG)  # only now: a refused start must not pin its config on the folder

    gradient_free = not getattr(model_class(cfg.model.method), "trained_by_gradient", True)
    # A memory bank wants each training image once: category balancing would only repeat rows.
    bank_spec = replace(spec, config=replace(spec.config, balanced=False))
    datasets = {"train": train_dataset(bank_spec if gradient_free else spec),
                "validation": validation_dataset(spec, chosen=validation)}
    validation_counts = {c: len(ids) for c, ids in validation.items()}
    run_ref = tracking.open_job_run(cfg.tracking, cfg.name, out / "mlflow_run_id", experiment=cfg)
    t = cfg.train
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    keep_best = CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=SELECTION_METRIC,
                                 checkpoint_score_order="max")
    trainer = TorchTrainer(
        bank_worker if gradient_free else train_worker,
        train_loop_config={"experiment": cfg.to_dict(), "categories": categories, "mlflow": run_ref.to_dict(),
                           "storage": str(out)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=per_worker,
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(name=RAY_RUN, storage_path=str(out), checkpoint_config=keep_best,
                             failure_config=FailureConfig(max_failures=t.max_failures), callbacks=callbacks),
        datasets=datasets,
        # The gradient path splits the validation set too: every rank scores its share at a checkpoint.
        dataset_config=EveryRowDataConfig(datasets_to_split=["train"]) if gradient_free
        else DataConfig(datasets_to_split=["train", "validation"]),
    )
    checkpoints.set_aside_unreadable_record(out / RAY_RUN)
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        actionable = checkpoints.user_error(exc, out)  # one line for the person, not Ray's traceback
        if actionable is None:
            raise
        raise actionable from None
    best = checkpoints.best_whole(out / RAY_RUN, SELECTION_METRIC)
    if best is None:
        raise checkpoints.DamagedCheckpoints(f"no whole checkpoint in {out / RAY_RUN} to export; move that folder "
                                             "aside to train from the start")
    metadata = export_model(cfg, categories, best, out / "model", validation_counts)
    print(f"exported the step-{metadata['step']} model (validation image AUROC {metadata['val_image_auroc']:.3f}, "
          f"pixel AUROC {metadata['val_pixel_auroc']:.3f}; selected by {SELECTION_METRIC} "
          f"{metadata[SELECTION_METRIC]:.3f}) to {out / 'model'}")
    with tracking.resume(run_ref) as active:
        tracking.log_metrics({f"best/{key}": metadata[key] for key in (SELECTION_METRIC, "val_image_auroc",
                                                                        "val_pixel_auroc", "threshold")})
        if active is not None and not cfg.tracking.log_model:  # where the model is, not a copy of it
            mlflow.set_tag("anomdiff.model_dir", str(out / "model"))
        elif active is not None:  # the store answers: the model goes to MLflow (and the registry) too
            try:
                logged = registry.log_once(out / "model", cfg.tracking.registered_model, out / LOGGED_MODEL)
            except Exception as exc:  # the model is exported whatever the store does: run the command again
                print(f"[tracking] the model is exported to {out / 'model'} but not logged to MLflow "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); the same "
                      "command logs it once the store answers", flush=True)
            else:
                print(f"the model in MLflow: {logged['model_uri']}" + (
                    f", registered as {logged['registered_model']} version {logged['version']}"
                    if logged["version"] else ""))
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="an experiment YAML (conf/experiment/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    runtime.add_address_argument(parser)
    runtime.add_print_config_argument(parser)
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        runtime.print_config(cfg.to_dict())
        return
    run(cfg, args.address)


if __name__ == "__main__":
    main()
