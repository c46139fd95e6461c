"""Hyperparameter search on Ray Tune, over training-time or inference-time keys, on the validation set.

    anomdiff tune --config conf/tune/inference.yaml model='${ANOMDIFF_HOME}/demo/run/model'
    anomdiff tune --config conf/tune/training.yaml data.path=DATA num_trials=8
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.tune --config conf/tune/training.yaml data.path=/data/realiad

The search file (``anomdiff.search``) names the base experiment, the space, the metric and the
number of trials. A training-time trial is a whole ``pipelines.train`` run (Ray Train + DeepSpeed
inside the trial) whose validation checkpoints report to Tune, so ASHA stops poor trials early; its
model stays in ``output_dir/trials/<trial>/``. An inference-time trial scores the validation set
with the one exported model, which the driver loads once and puts in the object store with the
decoded validation images. Optuna's TPE proposes configurations (Ray's default search for spaces
with ``grid`` values, which Optuna does not take). The same command resumes an interrupted search
without rerunning finished trials. Results: ``trials.csv``, a ranking, figures, ``best.yaml`` or
``best_model/``, and an MLflow parent run, opened before the first trial, with a child run per
trial logged from the driver at the end; a training trial's own training run (and its stages'
runs under it) is a child of the same parent run, in the same store.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import numpy as np
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from anomdiff.atomic import write_csv_atomic
from anomdiff.config import DataConfig, ExperimentConfig, apply_overrides, save_config
from anomdiff.lock import hold_folder
from anomdiff.search import SearchSpec, load_search, nested, yaml_value
from pipelines import autoscaling, runtime, tracking
from pipelines.data import DataSpec, validation_dataset
from pipelines.train import PLACEMENT_GROUP, PLACEMENT_GROUP_FILE, RESOLVED_CONFIG

OBJECTIVE = "objective"


def _record_launch(out: str) -> str:
    trial = tune.get_context().get_trial_id()
    runtime.record_launch(out, trial)
    return trial


# --- inside the trials -----------------------------------------------------------------------


def inference_trial(params: dict, model=None, batches=None, metric=None, out: str = "", device: str = "cpu") -> None:
    """Score the validation set with the shared model under ``params`` (inference keys); ``model`` is
    a fresh copy from the object store at every call, also in a reused process."""
    import torch

    from anomdiff.models.config import ModelConfig
    from anomdiff.validation import validate

    torch.set_num_threads(1)
    _record_launch(out)
    model.to(device)
    for key, value in params.items():
        model.cfg = ModelConfig.from_dict(nested(key.removeprefix("model."), value), base=model.cfg)
    images = sum(len(batch["image"]) for batch in batches)
    result = validate(model, ({k: torch.tensor(v, device=device) for k, v in batch.items()} for batch in batches),
                      max_images=images)
    low, high = result.pop("score_range")
    tune.report({**result, "score_range_low": low, "score_range_high": high,
                 OBJECTIVE: sum(w * result[name] for name, w in metric.items())})


class ReportObjective(TuneReportCallback):
    """Ray Train's reports forwarded to Tune with the search's objective added (a weighted mix)."""

    def __init__(self, metric: dict[str, float]):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        first = {**metrics[0], OBJECTIVE: sum(w * float(metrics[0][name]) for name, w in self.metric.items())}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def image_weight(metric: dict[str, float]) -> float:
    """The share of validation image AUROC in a search metric over image and pixel AUROC."""
    return metric.get("val_image_auroc", 0.0) / sum(metric.values())


def trial_folder(out: str | Path, trial_id: str) -> Path:
    """Where a training trial of the search in ``out`` trains: ``out/trials/<trial>/``."""
    return Path(out) / "trials" / trial_id


def training_trial(params: dict, base: dict | None = None, metric=None, out: str = "",
                   parent_run: str | None = None) -> None:
    """One training run of the base experiment with ``params``, in ``out/trials/<trial>/``; its MLflow
    run is a child of the search's run ``parent_run``."""
    from pipelines import train

    trial = _record_launch(out)
    folder = trial_folder(out, trial)
    # A trial's model is not a registry candidate (best.yaml's training is).
    # Its checkpoints are kept and exported by the search's own metric.
    overrides = [f"{k}={yaml_value(v)}" for k, v in params.items()] + [f"output_dir={folder}",
                                                                       "tracking.registered_model=null",
                                                                       "tracking.log_model=false",
                                                                       f"train.selection_image_weight={image_weight(metric)}"]
    cfg = ExperimentConfig.from_dict(apply_overrides(base, overrides))
    with tracking.nested_under(parent_run):
        train.run(cfg, callbacks=[ReportObjective(metric)])


class ReleaseStoppedTrainWorkers(tune.Callback):
    """When a training trial ends (finished, stopped by ASHA, failed), remove the placement group of
    its Ray Train workers: on Ray 2.60 a stopped trial's group can stay reserved and starve the
    trials after it (ray-project/ray#54305). The group is known from the file its workers' rank 0
    writes in the trial's folder as it starts (``PLACEMENT_GROUP_FILE``), so a trial stopped before
    its first report (in a VAE stage, say) is released too, and from its last report. A group that
    is already gone is left alone."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def _groups(self, trial) -> set[str]:
        groups = {(trial.last_result or {}).get(PLACEMENT_GROUP)}
        recorded = trial_folder(self.out, trial.trial_id) / PLACEMENT_GROUP_FILE
        if recorded.is_file():
            groups.add(recorded.read_text().strip())
        return {g for g in groups if g}

    def _release(self, trial) -> None:
        from ray.util.placement_group import PlacementGroup, placement_group_table

        for group_id in self._groups(trial):
            if placement_group_table().get(group_id, {}).get("state") not in (None, "REMOVED"):
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


# --- the driver --------------------------------------------------------------------------------


def _distribution(kind: str, args: list):
    return {"choice": lambda: tune.choice(args), "grid": lambda: tune.grid_search(args),
            "uniform": lambda: tune.uniform(*args), "loguniform": lambda: tune.loguniform(*args),
            "randint": lambda: tune.randint(*args)}[kind]()


def _searcher(spec: SearchSpec):
    """Optuna's TPE, or Ray's default search (grid values, ``search: random``, Optuna absent): said in the log."""
    if spec.search == "random":
        return None
    if any(d.kind == "grid" for d in spec.space.values()):
        print("[tune] the space has grid values, which Optuna does not take: Ray's default search", flush=True)
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=0)
    except ImportError:
        print("[tune] Optuna is not installed: Ray's default (random) search", flush=True)
        return None


def _num_samples(spec: SearchSpec) -> int:
    grid = math.prod(len(d.args) for d in spec.space.values() if d.kind == "grid")
    return max(1, math.ceil(spec.num_trials / grid))


def _concurrency(spec: SearchSpec, need: dict[str, float]) -> int:
    if spec.max_concurrent:
        return spec.max_concurrent
    have = autoscaling.growable_resources()
    fits = [int(have.get(name, 0) // amount) for name, amount in need.items() if amount > 0]
    return max(1, min(fits) if fits else 1)


def _validation_batches(spec: SearchSpec, cfg: ExperimentConfig, model) -> list[dict]:
    """The decoded validation images of the model's own training data (its run's hold-out fraction
    and seed, on ``data.path`` when given); as NumPy batches to share through the object store."""
    data = cfg.data
    saved_run = Path(spec.model).resolve().parent / RESOLVED_CONFIG
    if saved_run.is_file():  # the model's own hold-out (fraction, seed), so no training image is scored
        # Only its data section: a run written by an older version may hold keys that are gone since.
        data = DataConfig.from_dict(yaml.safe_load(saved_run.read_text()).get("data") or {}, _path="data")
        if any(o.startswith("data.path=") for o in spec.experiment_overrides):
            data = replace(data, path=cfg.data.path)
    elif not any(o.startswith("data.path=") for o in spec.experiment_overrides):
        raise ValueError(f"{spec.model}: no {RESOLVED_CONFIG} beside the model to find its training data; "
                         "give data.path=DATA")
    categories = model.metadata["categories"]
    data_spec = DataSpec.open(data, model.cfg.image_size, cfg.evaluate.batch_size)
    missing = [c for c in categories if c not in data_spec.manifest["counts"]]
    if missing:
        raise ValueError(f"{data.path} lacks the model's categories {missing[:5]}")
    dataset = validation_dataset(replace(data_spec, categories=categories), limit=cfg.train.validation_images)
    return [{"image": b["image"], "category_index": b["category_index"]}
            for b in dataset.iter_batches(batch_size=cfg.evaluate.batch_size, batch_format="numpy")]


SEARCH_FILE = "search.json"  # what this output_dir searches: a resumed search must be the same search


def _same_search(spec: SearchSpec, out: Path) -> None:
    """Record the search in ``out`` the first time; refuse to resume a different one there."""
    runtime.same_job_or_refuse(out, SEARCH_FILE, {
        "experiment": spec.experiment, "space": {k: [d.kind, d.args] for k, d in spec.space.items()},
        "metric": spec.metric, "num_trials": spec.num_trials,
        "model": str(Path(spec.model).resolve()) if spec.model else None, "overrides": spec.experiment_overrides,
        "search": spec.search, "scheduler": spec.scheduler, "reduction_factor": spec.reduction_factor}, "search")


def run(spec: SearchSpec, address: str | None = None) -> dict:
    """Run (or resume) the search; returns the best trial's row. One search at a time writes into
    ``output_dir`` (``anomdiff.lock``)."""
    with hold_folder(Path(spec.output_dir).resolve()):
        return _search(spec, address)


def _search(spec: SearchSpec, address: str | None) -> dict:
    from anomdiff.models import load_model

    out = Path(spec.output_dir).resolve()
    # Trials run in working directories of Ray Tune's: every path they read is made absolute here.
    runtime.pin_home()
    cfg = spec.config()
    cfg = ExperimentConfig.from_dict(apply_overrides(cfg.to_dict(), runtime.absolute_path_overrides(cfg)))
    tracking.check_server(cfg.tracking)
    _same_search(spec, out)
    if not spec.inference_time:
        DataSpec.open(cfg.data, cfg.model.image_size)  # a missing or unreadable dataset stops it here
    model = load_model(spec.model) if spec.inference_time else None
    if model is not None:
        model.eval()
    runtime.start_ray(address)  # out exists: _same_search made it
    # The store exists before any trial could touch it, with the search's run that the trials' runs nest under.
    parent = _search_run(spec, cfg, out)
    param_space = {key: _distribution(d.kind, d.args) for key, d in spec.space.items()}
    if spec.inference_time:
        batches = _validation_batches(spec, cfg, model)
        device = "cuda" if cfg.train.use_gpu else "cpu"
        need = {"CPU": 1.0, "GPU": 1.0 if cfg.train.use_gpu else 0.0}
        trainable = tune.with_parameters(inference_trial, model=model, batches=batches, metric=spec.metric,
                                         out=str(out), device=device)
        scheduler, callbacks = None, []
    else:
        t = cfg.train
        # Each run's workers, and a CPU for its Parquet reads (Ray Data's read tasks take a whole one).
        need = {"CPU": t.num_workers * t.cpus_per_worker + max(1.0, cfg.data.decode_cpus),
                "GPU": float(t.num_workers) if t.use_gpu else 0.0}
        trainable = tune.with_parameters(training_trial, base=cfg.to_dict(), metric=spec.metric, out=str(out),
                                         parent_run=parent.run_id)
        # max_t past the last step: ASHA stops a trial that reaches max_t, before it could export its model.
        scheduler = (tune.schedulers.ASHAScheduler(time_attr="step", max_t=t.steps + 1, grace_period=t.checkpoint_every,
                                                   reduction_factor=spec.reduction_factor)
                     if spec.scheduler == "asha" and t.checkpoint_every < t.steps else None)
        callbacks = [ReleaseStoppedTrainWorkers(out)]
    trial_resources = {"CPU": 1.0, **({"GPU": 1.0} if cfg.train.use_gpu else {})} if spec.inference_time \
        else {"CPU": 0.01}  # a training trial only waits on its Ray Train run, whose workers reserve their own
    trainable = tune.with_resources(trainable, trial_resources)
    concurrency = _concurrency(spec, need)
    kind = "inference-time" if spec.inference_time else "training-time"
    print(f"[tune] {kind} search of {', '.join(spec.space)}: {spec.num_trials} trials, {concurrency} at a time",
          flush=True)
    storage = out / "ray"
    if tune.Tuner.can_restore(storage / "search"):
        print(f"[tune] resuming the search in {storage / 'search'}", flush=True)
        tuner = tune.Tuner.restore(str(storage / "search"), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", num_samples=_num_samples(spec),
                                        search_alg=_searcher(spec), scheduler=scheduler,
                                        max_concurrent_trials=concurrency,
                                        # An inference trial lasts seconds: starting a fresh process
                                        # (torch imported, model fetched) for each would cost as much.
                                        reuse_actors=spec.inference_time),
            run_config=tune.RunConfig(name="search", storage_path=str(storage), callbacks=callbacks, verbose=1))
    grid = tuner.fit()
    rows = _rows(spec, cfg, grid)
    unfinished = [r for r in rows if r["status"] not in ("done", "stopped early", "error")]
    if unfinished or not rows:
        raise SystemExit(f"[tune] interrupted with {len(unfinished)} trials unfinished: run the same command to "
                         "resume")
    return _results(spec, cfg, rows, model, out)


def _rows(spec: SearchSpec, cfg: ExperimentConfig, grid) -> list[dict]:
    """One row per trial: parameters, the metric (its best report), validation metrics, status, time."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        metrics = result.metrics or {}
        if history is not None and OBJECTIVE in history and history[OBJECTIVE].notna().any():
            best = history.loc[history[OBJECTIVE].idxmax()].to_dict()
        else:
            best = metrics
        if result.error is not None:
            status = "error"
        elif OBJECTIVE not in metrics:
            status = "unfinished"
        elif not spec.inference_time and metrics.get("step", cfg.train.steps) < cfg.train.steps:
            status = "stopped early"
        else:
            status = "done"
        rows.append({"trial": metrics.get("trial_id") or Path(result.path).name.split("_")[-1],
                     **{key: (result.config or {}).get(key) for key in spec.space},
                     "metric": best.get(OBJECTIVE), "val_image_auroc": best.get("val_image_auroc"),
                     "val_pixel_auroc": best.get("val_pixel_auroc"), "status": status,
                     "time_s": metrics.get("time_total_s"), "steps": metrics.get("step"),
                     "_best": best, "_order": metrics.get("timestamp") or 0})
    return rows


def _results(spec: SearchSpec, cfg: ExperimentConfig, rows: list[dict], model, out: Path) -> dict:
    ranked = sorted((r for r in rows if r["metric"] is not None), key=lambda r: -r["metric"])
    if not ranked:
        raise RuntimeError(f"[tune] no trial reported {OBJECTIVE}; see the trials' errors under {out / 'ray'}")
    best = ranked[0]
    columns = ["trial", *spec.space, "metric", "val_image_auroc", "val_pixel_auroc", "status", "time_s", "steps"]
    write_csv_atomic(out / "trials.csv", sorted(rows, key=lambda r: r["_order"]), columns, extras="ignore")
    print(f"[tune] ranking by {' + '.join(f'{w:g} x {m}' for m, w in spec.metric.items())} (validation):")
    for place, row in enumerate(ranked[:10], start=1):
        params = ", ".join(f"{k}={row[k]}" for k in spec.space)
        print(f"  {place:>2}. {row['metric']:.4f}  {params}  ({row['status']}, trial {row['trial']})")
    figures = _figures(spec, rows, out / "figures")
    params = {key: best[key] for key in spec.space}
    if spec.inference_time:
        artifact = _best_model(spec, model, params, best["_best"], out / "best_model")
    else:
        best_cfg = spec.config(params)
        best_cfg.output_dir = str(out / "best_run")
        artifact = out / "best.yaml"
        save_config(best_cfg, artifact)
    print(f"[tune] best: {best['metric']:.4f} with {params}; {artifact}")
    _log(spec, cfg, rows, best, out, [*figures.values(), out / "trials.csv"],
         artifact if artifact.is_file() else artifact / "config.json")
    return {k: v for k, v in best.items() if not k.startswith("_")}


def _best_model(spec: SearchSpec, model, params: dict, result: dict, folder: Path) -> Path:
    """The searched model with the best trial's inference settings, and the threshold and score range
    that trial's validation found under them (so evaluate and promotion take it as it is)."""
    from anomdiff.models.config import ModelConfig

    for key, value in params.items():
        model.cfg = ModelConfig.from_dict(nested(key.removeprefix("model."), value), base=model.cfg)
    metadata = {**model.metadata, "threshold": float(result["threshold"]),
                "score_range": [float(result["score_range_low"]), float(result["score_range_high"])],
                **{name: float(result[name]) for name in ("val_image_auroc", "val_pixel_auroc")},
                "tuned": {"from": str(Path(spec.model).resolve()), "params": params}}
    model.save(folder, metadata=metadata)
    return folder


def _figures(spec: SearchSpec, rows: list[dict], folder: Path) -> dict[str, Path]:
    """The metric against each searched key, and against trial order (early-stopped trials marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if r["metric"] is not None]
    stopped = [r["status"] == "stopped early" for r in scored]
    paths = {}
    for key in spec.space:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        values = [r[key] for r in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        xs = values if numeric else [sorted(map(str, set(values))).index(str(v)) for v in values]
        ax.scatter(xs, [r["metric"] for r in scored], c=["tab:red" if s else "tab:blue" for s in stopped], s=18)
        if not numeric:
            ax.set_xticks(range(len(set(map(str, values)))), sorted(map(str, set(values))))
        if spec.space[key].kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("validation metric")
        fig.tight_layout()
        paths[key] = folder / f"metric_vs_{key.replace('.', '_')}.png"
        fig.savefig(paths[key], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    order = sorted(scored, key=lambda r: r["_order"])
    ax.scatter(range(1, len(order) + 1), [r["metric"] for r in order],
               c=["tab:red" if r["status"] == "stopped early" else "tab:blue" for r in order], s=18)
    ax.plot(range(1, len(order) + 1), np.maximum.accumulate([r["metric"] for r in order]), color="gray", lw=1)
    ax.set_xlabel("trial (order of completion; red: stopped early)")
    ax.set_ylabel("validation metric")
    fig.tight_layout()
    paths["order"] = folder / "metric_vs_trial.png"
    fig.savefig(paths["order"], dpi=110)
    plt.close(fig)
    return paths


def _search_run(spec: SearchSpec, cfg: ExperimentConfig, out: Path) -> tracking.RunRef:
    """The search's MLflow run (created once, ``out/mlflow_run_id``; a resumed search reopens it)."""
    return tracking.open_job_run(cfg.tracking, f"tune {Path(spec.output_dir).name}", out / "mlflow_run_id",
                                 tags={"anomdiff.job": "tune"})


def _log(spec: SearchSpec, cfg: ExperimentConfig, rows: list[dict], best: dict, out: Path, files: list[Path],
         artifact: Path) -> None:
    """The search's parent run: its summary and a nested child run per trial (beside the trials'
    own training runs), logged from the driver only."""
    ref = _search_run(spec, cfg, out)
    with tracking.resume(ref) as active:
        if active is None:
            return
        mlflow.log_params({"space": json.dumps({k: [d.kind, d.args] for k, d in spec.space.items()})[:6000],
                           "metric": json.dumps(spec.metric), "num_trials": spec.num_trials,
                           "kind": "inference" if spec.inference_time else "training",
                           "experiment": spec.experiment, "model": spec.model or ""})
        logged = {r.data.tags.get("anomdiff.trial") for r in mlflow.search_runs(
            filter_string=f"tags.mlflow.parentRunId = '{ref.run_id}'", output_format="list")}
        for row in rows:
            if row["trial"] in logged:  # a resumed search logs only the trials it has not logged
                continue
            with mlflow.start_run(run_name=f"trial {row['trial']}", nested=True):
                mlflow.set_tags({"anomdiff.trial": row["trial"], "status": row["status"]})
                mlflow.log_params({k: row[k] for k in spec.space})
                mlflow.log_metrics({k: float(row[k]) for k in ("metric", "val_image_auroc", "val_pixel_auroc",
                                                                "time_s") if row.get(k) is not None})
        mlflow.log_metrics({"best_metric": float(best["metric"])})
        mlflow.set_tag("best_params", json.dumps({k: best[k] for k in spec.space})[:5000])
        for path in files:
            tracking.log_artifact(path, "search")
        tracking.log_artifact(artifact, "search")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff tune", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a search file (conf/tune/)")
    parser.add_argument("overrides", nargs="*", help="experiment=, num_trials=, output_dir=, model=, metric=, "
                                                     "space=...; any other dotted key=value applies to the base "
                                                     "experiment (data.path=DATA, train.steps=200)")
    runtime.add_address_argument(parser)
    runtime.add_print_config_argument(parser)
    args = parser.parse_intermixed_args(argv)
    spec = load_search(args.config, args.overrides)
    if args.print_config:
        search = {k: v for k, v in asdict(spec).items() if k != "experiment_overrides"}
        runtime.print_config({**search, "base_experiment": spec.config().to_dict()})
        return
    run(spec, args.address)


if __name__ == "__main__":
    main()
