"""Category scaling: how accuracy and cost change as one model carries more categories.

    anomdiff scale --config conf/scale/synthetic.yaml data.path=DATA
    anomdiff scale --config conf/scale/synthetic.yaml data.path=DATA categories=[2,4] methods=[knn,diad]
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.scale --config conf/scale/synthetic.yaml data.path=/data/realiad

The sweep file (``anomdiff.sweep``) names the base experiment, the category counts K, the methods
and the budget rule (default ``per_category``: the same steps per category at every K, the
condition of the DPDiff-AD paper's claim; ``total``: the same steps at every K). Each cell (K,
method) is a Ray task that trains on the first K categories of one seeded order with
``pipelines.train.run`` (Ray Train inside the task) and evaluates the exported model on those K
categories' test split with ``pipelines.evaluate.evaluate``; as many cells run at once as the
cluster's CPUs (and GPUs) hold their workers plus a CPU for Ray Data's Parquet reads. A finished
cell writes ``output_dir/cells/K<k>-<method>-<fingerprint>/result.json`` (the fingerprint: 8 hex digits of
its resolved experiment, so other settings never reuse a result; ``sweep.json`` refuses a sweep of
another base in the same folder); the same command after an interruption
or a failure runs only the cells without one (a cell's training resumes from its own folder; a
finished training is reused with the time it recorded).

Results, from the driver only: ``scaling.csv`` (a row per cell: image and pixel AUROC, AUPRO and
image AP as mean and spread over the categories, the anchor categories' AUROC, training time, the
denoiser's training images/s, evaluation images/s, rank 0's peak worker memory, trained parameters
and every value the exported model holds (a memory bank included)),
figures in ``figures/``, and an MLflow parent run with a child run per cell.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
import ray

from anomdiff.atomic import write_csv_atomic, write_json_atomic
from anomdiff.lock import hold_folder
from anomdiff.sweep import Cell, SweepSpec, load_sweep, spread
from pipelines import autoscaling, runtime, tracking

SWEEP_FILE = "sweep.json"
RESULT = "result.json"
TRAIN_TIME = "train_time.json"  # the training's wall time, kept when only a cell's evaluation is redone
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap")
COLUMNS = ["K", "method", "steps", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
           "anchor_categories", "anchor_image_auroc", "anchor_pixel_auroc", "train_s", "train_images_per_s",
           "eval_s", "eval_images_per_s", "worker_peak_rss_mb", "cell_peak_rss_mb", "parameters", "model_values"]


# --- inside a cell -----------------------------------------------------------------------------


def _train_images_per_s(cfg, out: Path) -> float | None:
    """The denoiser's training images/s: its median logged steps/s x the images in one optimizer step
    (``None`` for a method trained by no gradient, or when the store has no such run)."""
    from pipelines.bench.methods import _denoiser_steps_per_s

    try:
        steps_per_s = _denoiser_steps_per_s(out)
    except Exception:  # no denoiser run (knn), or the store did not answer
        return None
    t = cfg.train
    return steps_per_s * t.batch_size * t.num_workers * t.grad_accum if steps_per_s else None


def run_cell(spec: SweepSpec, cell: Cell, separate_store: bool) -> dict:
    """Train and evaluate one cell in ``output_dir/cells/<cell>/``; writes and returns its result."""
    import resource

    from anomdiff.models import load_model
    from pipelines import evaluate, train

    folder = Path(spec.output_dir) / "cells" / spec.folder_of(cell)
    folder.mkdir(parents=True, exist_ok=True)
    runtime.record_launch(spec.output_dir, cell.name)
    store = tracking.own_sqlite_store(folder) if separate_store else []
    # A cell's model is a measurement, not a registry candidate.
    cfg = spec.config(cell, [f"output_dir={folder / 'run'}", "tracking.registered_model=null",
                             "tracking.log_model=false", *store])
    timing = folder / TRAIN_TIME
    if timing.is_file() and (folder / "run" / "model").is_dir():  # trained before: only the evaluation failed
        train.preflight(cfg)  # the same experiment as the model's
        train_s = json.loads(timing.read_text())["train_s"]
        metadata = load_model(folder / "run" / "model").metadata
    else:
        tick = time.perf_counter()
        metadata = train.run(cfg)
        train_s = time.perf_counter() - tick
        write_json_atomic(timing, {"train_s": train_s})
    tick = time.perf_counter()
    doc = evaluate.evaluate(str(folder / "run" / "model"), cfg.data.path, str(folder / "evaluation"),
                            [f"evaluate.batch_size={cfg.evaluate.batch_size}", f"use_gpu={cfg.train.use_gpu}",
                             f"tracking.experiment={cfg.tracking.experiment}", *store])
    eval_s = time.perf_counter() - tick
    model = load_model(folder / "run" / "model")
    result = {
        "K": cell.k, "method": cell.method, "categories": metadata["categories"], "steps": cfg.train.steps,
        "vae_steps": cfg.train.vae_steps, "train_s": train_s, "eval_s": eval_s, "num_images": doc["num_images"],
        "eval_images_per_s": doc["num_images"] / eval_s, "train_images_per_s": _train_images_per_s(cfg, folder / "run"),
        "worker_peak_rss_mb": metadata.get(train.WORKER_PEAK_RSS),
        "cell_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": int(model.parameter_counts()["total"]),
        "model_values": sum(t.numel() for t in model.state_dict().values()),
        "mean": doc["mean"], "per_category": {c: {m: row.get(m) for m in METRICS}
                                              for c, row in doc["per_category"].items()},
    }
    write_json_atomic(folder / RESULT, result)
    return result


@ray.remote(num_cpus=0.01, max_retries=0, max_calls=1)  # a fresh process per cell: its own peak RSS
def cell_task(spec: SweepSpec, cell: Cell, separate_store: bool) -> dict:
    """A cell as a Ray task: it only waits on its Ray Train run, whose workers reserve their own CPUs."""
    return run_cell(spec, cell, separate_store)


# --- the driver --------------------------------------------------------------------------------


def concurrency(cfg) -> int:
    """How many cells fit at once: each needs its Train workers and one CPU for Ray Data's Parquet
    read tasks (which take a whole CPU), and its workers' GPUs."""
    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker + max(1.0, cfg.data.decode_cpus),
            "GPU": float(t.num_workers) if t.use_gpu else 0.0}
    have = autoscaling.growable_resources()  # what the cluster can grow to, not what it has at start
    return max(1, min(int(have.get(name, 0) // amount) for name, amount in need.items() if amount > 0))


def read_result(spec: SweepSpec, cell: Cell) -> dict | None:
    path = Path(spec.output_dir) / "cells" / spec.folder_of(cell) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def run(spec: SweepSpec, address: str | None = None) -> list[dict]:
    """Run (or finish) the sweep; returns the rows of ``scaling.csv``. One sweep at a time writes into
    ``output_dir`` (``anomdiff.lock``)."""
    spec.output_dir = str(Path(spec.output_dir).resolve())
    # Cells run wherever Ray puts their tasks: every path they read is made absolute here.
    runtime.pin_home()
    spec.experiment_overrides = [*spec.experiment_overrides, *runtime.absolute_path_overrides(spec.base())]
    with hold_folder(spec.output_dir):
        return _sweep(spec, address)


def _same_sweep(spec: SweepSpec, out: Path) -> None:
    """Record the sweep's base (experiment, overrides, budget) in ``out`` the first time; refuse to
    resume a sweep of another base there. Other K or methods add cells; a cell whose settings changed
    gets a new folder (its fingerprint) instead of a finished cell's result."""
    runtime.same_job_or_refuse(out, SWEEP_FILE, {"experiment": spec.experiment, "overrides": spec.experiment_overrides,
                                                 "budget": spec.budget}, "sweep")


def _sweep(spec: SweepSpec, address: str | None) -> list[dict]:
    out = Path(spec.output_dir)
    _same_sweep(spec, out)
    base = spec.base()
    tracking.check_server(base.tracking)
    runtime.start_ray(address)
    out.mkdir(parents=True, exist_ok=True)
    tracking.use_experiment(base.tracking)  # the store exists before any cell could touch it
    separate = tracking.uses_sqlite(base.tracking)
    cells = spec.cells()
    todo = [c for c in cells if read_result(spec, c) is None]
    at_once = concurrency(base)
    print(f"[scale] {len(cells)} cells (K = {', '.join(map(str, spec.categories))} x {', '.join(spec.methods)}), "
          f"budget {spec.budget}; {len(cells) - len(todo)} done before, {len(todo)} to run, {at_once} at a time",
          flush=True)
    failed: dict[str, str] = {}
    pending: dict = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < at_once:
            cell = queue.pop(0)
            pending[cell_task.remote(spec, cell, separate)] = cell
        ready, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
            print(f"[scale] {cell.name}: image AUROC {result['mean']['image_auroc']:.3f}, pixel AUROC "
                  f"{_fmt(result['mean']['pixel_auroc'])}, trained in {result['train_s']:.0f} s", flush=True)
        except Exception as exc:  # the other cells go on; the same command redoes this one
            failed[cell.name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}"
            print(f"[scale] {cell.name} failed: {failed[cell.name]}", flush=True)
    results = [r for r in (read_result(spec, c) for c in cells) if r is not None]
    rows = _rows(spec, results)
    if rows:
        _results(spec, base, rows, results, out)
    if failed:
        raise SystemExit(f"[scale] {len(failed)} of {len(cells)} cells failed ({', '.join(failed)}): run the same "
                         "command to redo only those")
    return rows


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _rows(spec: SweepSpec, results: list[dict]) -> list[dict]:
    anchors = spec.anchors()
    rows = []
    for r in sorted(results, key=lambda r: (spec.methods.index(r["method"]) if r["method"] in spec.methods else 99,
                                            r["K"])):
        per = r["per_category"]
        row = {"K": r["K"], "method": r["method"], "steps": r["steps"]}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = spread([v.get(metric) for v in per.values()])
        row["anchor_categories"] = len(anchors)
        for metric in ("image_auroc", "pixel_auroc"):
            row[f"anchor_{metric}"] = spread([per[c].get(metric) for c in anchors if c in per])[0]
        row.update({k: r.get(k) for k in ("train_s", "train_images_per_s", "eval_s", "eval_images_per_s",
                                          "worker_peak_rss_mb", "cell_peak_rss_mb", "parameters",
                                          "model_values")})
        rows.append(row)
    return rows


def _results(spec: SweepSpec, base, rows: list[dict], results: list[dict], out: Path) -> None:
    write_csv_atomic(out / "scaling.csv", rows, COLUMNS)
    print(f"[scale] {out / 'scaling.csv'}:")
    for row in rows:
        print(f"  K={row['K']:>4} {row['method']:>8}: image AUROC {row['image_auroc_mean']:.3f} "
              f"+- {row['image_auroc_std']:.3f}, anchors {row['anchor_image_auroc']:.3f}, "
              f"train {row['train_s']:.0f} s", flush=True)
    figures = _figures(spec, rows, results, out / "figures")
    _log(spec, base, rows, out, [out / "scaling.csv", *figures])


def _by_method(spec: SweepSpec, rows: list[dict]) -> dict[str, list[dict]]:
    grouped = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["K"]) for m in spec.methods}
    return {m: g for m, g in grouped.items() if g}


def _log_k_axis(ax, spec: SweepSpec) -> None:
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(spec.categories, [str(k) for k in spec.categories])
    ax.set_xlabel("categories K")


def _figures(spec: SweepSpec, rows: list[dict], results: list[dict], folder: Path) -> list[Path]:
    """AUROC against K (a band: the spread over categories; dashed: the anchor categories), per-category
    AUROC as a box per K, cost against K, and the drop from the smallest to the largest K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    grouped = _by_method(spec, rows)
    paths = []

    def save(fig, name: str, rect=(0, 0, 1, 1)) -> None:
        fig.tight_layout(rect=rect)
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        paths.append(folder / name)

    def quartiles(method: str, k: int, metric: str) -> list[float]:
        cell = next(r for r in results if r["method"] == method and r["K"] == k)
        values = [v[metric] for v in cell["per_category"].values() if v.get(metric) is not None]
        return list(np.percentile(values, [25, 75])) if values else [np.nan, np.nan]

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("image_auroc", "pixel_auroc"), strict=True):
        for method, group in grouped.items():
            ks = [r["K"] for r in group]
            line, = ax.plot(ks, [r[f"{metric}_mean"] for r in group], marker="o", label=method)
            # The interquartile range over categories: a band of +-1 sd would leave AUROC's [0, 1].
            low, high = np.array([quartiles(method, k, metric) for k in ks]).T
            ax.fill_between(ks, low, high, color=line.get_color(), alpha=0.15)
            ax.plot(ks, [r[f"anchor_{metric}"] for r in group], ls="--", color=line.get_color(), lw=1)
        _log_k_axis(ax, spec)
        ax.set_ylabel(metric.replace("_", " ").replace("auroc", "AUROC"))
        ax.set_title("mean over categories; band: their 25-75th percentiles", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="method (dashed: the anchor categories)", fontsize=8, title_fontsize=8,
               loc="lower center", ncol=len(labels), frameon=False)
    save(fig, "auroc_vs_categories.png", rect=(0, 0.1, 1, 1))

    fig, axes = plt.subplots(1, len(grouped), figsize=(3.6 * len(grouped), 3.2), squeeze=False)
    for ax, method in zip(axes[0], grouped, strict=True):
        cells = sorted((r for r in results if r["method"] == method), key=lambda r: r["K"])
        ax.boxplot([[v["image_auroc"] for v in r["per_category"].values() if v.get("image_auroc") is not None]
                    for r in cells], tick_labels=[str(r["K"]) for r in cells])
        ax.set_title(method)
        ax.set_xlabel("categories K")
        ax.set_ylabel("per-category image AUROC")
    save(fig, "per_category_auroc.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method, group in grouped.items():
        ks = [r["K"] for r in group]
        axes[0].plot(ks, [r["train_s"] for r in group], marker="o", label=method)
        axes[1].plot(ks, [r["worker_peak_rss_mb"] if r["worker_peak_rss_mb"] is not None else math.nan
                          for r in group], marker="o", label=method)
    for ax, label in zip(axes, ("training time (s)", "peak worker memory, rank 0 (MB RSS)"), strict=True):
        _log_k_axis(ax, spec)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    save(fig, "cost_vs_categories.png")

    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    methods = list(grouped)
    x = np.arange(len(methods))
    for offset, metric in ((-0.2, "image_auroc"), (0.2, "pixel_auroc")):
        drops = [grouped[m][0][f"{metric}_mean"] - grouped[m][-1][f"{metric}_mean"] for m in methods]
        ax.bar(x + offset, drops, width=0.4, label=metric.replace("_", " "))
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(x, methods)
    ax.set_ylabel(f"drop from K={min(spec.categories)} to K={max(spec.categories)}")
    ax.legend(fontsize=8)
    save(fig, "auroc_drop.png")
    return paths


def _log(spec: SweepSpec, base, rows: list[dict], out: Path, files: list[Path]) -> None:
    """A parent run for the sweep and a nested child run per cell, logged from the driver only."""
    ref = tracking.open_job_run(base.tracking, f"scale {out.name}", out / "mlflow_run_id",
                                tags={"anomdiff.job": "scale"})
    with tracking.resume(ref) as active:
        if active is None:
            return
        if not mlflow.get_run(ref.run_id).data.params:
            mlflow.log_params({"experiment": spec.experiment, "categories": json.dumps(spec.categories),
                               "methods": json.dumps(spec.methods), "budget": spec.budget,
                               "overrides": json.dumps(spec.experiment_overrides)[:6000]})
        logged = {r.data.tags.get("anomdiff.cell") for r in mlflow.search_runs(
            filter_string=f"tags.mlflow.parentRunId = '{ref.run_id}'", output_format="list")}
        for row in rows:
            name = Cell(row["K"], row["method"]).name
            if name in logged:  # a rerun logs only the cells it has not logged
                continue
            with mlflow.start_run(run_name=name, nested=True):
                mlflow.set_tags({"anomdiff.cell": name})
                mlflow.log_params({"K": row["K"], "method": row["method"], "steps": row["steps"]})
                mlflow.log_metrics({k: float(v) for k, v in row.items() if k not in ("K", "method", "steps")
                                    and isinstance(v, int | float) and not math.isnan(float(v))})
        for path in files:
            tracking.log_artifact(path, "scaling")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff scale", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a sweep file (conf/scale/)")
    parser.add_argument("overrides", nargs="*", help="experiment=, categories=[K,...], methods=[...], budget=, "
                                                     "output_dir=; any other dotted key=value applies to the base "
                                                     "experiment of every cell (data.path=DATA, train.steps=100)")
    runtime.add_address_argument(parser)
    runtime.add_print_config_argument(parser)
    args = parser.parse_intermixed_args(argv)
    spec = load_sweep(args.config, args.overrides)
    if args.print_config:
        sweep = {k: v for k, v in asdict(spec).items() if k not in ("experiment_overrides",
                                                                                  "dataset_categories")}
        runtime.print_config({**sweep, "base_experiment": spec.base().to_dict()})
        return
    run(spec, args.address)


if __name__ == "__main__":
    main()
