"""Category scaling: how accuracy and cost change as one model carries more categories.

    anomdiff scale --config conf/scale/synthetic.yaml data.path=DATA
    anomdiff scale --config conf/scale/synthetic.yaml data.path=DATA categories=[2,4] methods=[knn,diad]
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.scale --config conf/scale/synthetic.yaml data.path=/data/realiad

The sweep file (``anomdiff.sweep``) names the base experiment, the category counts K, the methods,
the budget rule (default ``per_category``: the same steps per category at every K, the condition of
the DPDiff-AD paper's claim; ``total``: the same steps at every K) and the seeds (default: the base
experiment's seed alone). Each cell (K, method, seed) is a Ray task that trains on the first K
categories of one seeded order with ``pipelines.train.run`` (Ray Train inside the task) and
evaluates the exported model on those K categories' test split with
``pipelines.evaluate.evaluate``; as many cells run at once as the cluster's CPUs (and GPUs) hold
their workers plus a CPU for Ray Data's Parquet reads. A finished cell writes
``output_dir/cells/K<k>-<method>-seed<seed>-<fingerprint>/result.json`` (the fingerprint: 8 hex
digits of its resolved experiment, so other settings never reuse a result; ``sweep.json`` refuses a
sweep of another base in the same folder, while more K, methods or seeds add cells); the same
command after an interruption or a failure runs only the cells without one (a cell's training
resumes from its own folder; a finished training is reused with the time it recorded).

Results, from the driver only: ``scaling.csv`` (a row per method and K, each value the mean over
its seeds, the accuracy values with the seeds' min..max: image and pixel AUROC, AUPRO and image AP
as mean and spread over the categories, the anchor categories' AUROC, what training cost (steps,
wall time, training images seen, knn's bank rows), the denoiser's training images/s, evaluation
images/s, rank 0's peak worker memory, trained parameters and every value the exported model
holds), ``scaling.json`` (those rows and each method's drop of the anchor categories' AUROC from
the smallest to the largest K), figures in ``figures/``, and an MLflow parent run, opened before
the first cell, with a child run per cell logged from the driver at the end; each cell's training
and evaluation runs are children of the same parent run, in the same store.
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
from anomdiff.models import model_class
from anomdiff.sweep import Cell, SweepSpec, load_sweep, spread
from pipelines import autoscaling, runtime, tracking

SWEEP_FILE = "sweep.json"
RESULT = "result.json"
SUMMARY = "scaling.json"
TRAIN_TIME = "train_time.json"  # the training's wall time, kept when only a cell's evaluation is redone
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap")
ANCHOR_METRICS = ("image_auroc", "pixel_auroc")
# The accuracy values that get the seeds' band: (the column of their mean over seeds, its band's prefix).
BANDED = [*((f"{m}_mean", m) for m in METRICS), *((f"anchor_{m}", f"anchor_{m}") for m in ANCHOR_METRICS)]
BAND = "min..max over the seeds of each cell's value (empty with one seed)"
COSTS = ("train_s", "images_seen", "bank_patches", "train_images_per_s", "eval_s", "eval_images_per_s",
         "worker_peak_rss_mb", "cell_peak_rss_mb", "parameters", "model_values")
COLUMNS = ["K", "method", "seeds", "steps", "train_s", "images_seen", "bank_patches",
           *(f"{m}_{s}" for m in METRICS for s in ("mean", "std", "seed_min", "seed_max")), "anchor_categories",
           *(f"anchor_{m}{s}" for m in ANCHOR_METRICS for s in ("", "_seed_min", "_seed_max")),
           "train_images_per_s", "eval_s", "eval_images_per_s", "worker_peak_rss_mb", "cell_peak_rss_mb",
           "parameters", "model_values"]


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


def _training_images(cfg) -> int:
    """The training normals of the cell's categories less the validation hold-out: the rows a memory
    bank's one pass reads (sample ids only, from the Parquet shards)."""
    import pyarrow.parquet as pq

    from anomdiff.data.manifest import shard_paths
    from anomdiff.data.splits import is_validation
    from pipelines.data import DataSpec

    spec = DataSpec.open(cfg.data, cfg.model.image_size, cfg.train.batch_size)
    d = cfg.data
    return sum(not is_validation(s, d.validation_fraction, d.validation_seed)
               for path in shard_paths(spec.path, spec.manifest, "train", spec.categories)
               for s in pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist())


def _cost(cfg, model) -> dict:
    """What a cell's training went through besides its wall time. ``images_seen``: for a method
    trained by gradient, its optimizer steps (both stages where it has a VAE stage) x images per step;
    for one that is not (knn), its training images, each read once to build the bank.
    ``bank_patches``: the rows the memory bank keeps (``None`` without a bank)."""
    if getattr(model, "trained_by_gradient", True):
        t = cfg.train
        steps = t.steps + (t.vae_steps if "vae" in getattr(model, "stages", ()) else 0)
        return {"images_seen": steps * t.batch_size * t.grad_accum * t.num_workers, "bank_patches": None}
    return {"images_seen": _training_images(cfg), "bank_patches": int(len(model.memory))}


def run_cell(spec: SweepSpec, cell: Cell, parent_run: str | None = None) -> dict:
    """Train and evaluate one cell in ``output_dir/cells/<cell>/``; writes and returns its result. Its
    training and evaluation runs are children of the sweep's run ``parent_run``."""
    with tracking.nested_under(parent_run):
        return _run_cell(spec, cell)


def _run_cell(spec: SweepSpec, cell: Cell) -> dict:
    import resource

    from anomdiff.models import load_model
    from pipelines import evaluate, train

    folder = Path(spec.output_dir) / "cells" / spec.folder_of(cell)
    folder.mkdir(parents=True, exist_ok=True)
    runtime.record_launch(spec.output_dir, cell.name)
    # A cell's model is a measurement, not a registry candidate.
    cfg = spec.config(cell, [f"output_dir={folder / 'run'}", "tracking.registered_model=null",
                             "tracking.log_model=false"])
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
    # The evaluation logs to the sweep's store and experiment, where its run nests under the sweep's run.
    store = [f"tracking.tracking_uri={cfg.tracking.tracking_uri}"] if cfg.tracking.tracking_uri else []
    doc = evaluate.evaluate(str(folder / "run" / "model"), cfg.data.path, str(folder / "evaluation"),
                            [f"evaluate.batch_size={cfg.evaluate.batch_size}", f"use_gpu={cfg.train.use_gpu}",
                             f"tracking.experiment={cfg.tracking.experiment}", *store])
    eval_s = time.perf_counter() - tick
    model = load_model(folder / "run" / "model")
    result = {
        "K": cell.k, "method": cell.method, "seed": cell.seed, "categories": metadata["categories"],
        "steps": cfg.train.steps, **_cost(cfg, model),
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
def cell_task(spec: SweepSpec, cell: Cell, parent_run: str | None) -> dict:
    """A cell as a Ray task: it only waits on its Ray Train run, whose workers reserve their own CPUs."""
    return run_cell(spec, cell, parent_run)


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
    """The cell's finished result, from its folder or the one a sweep before ``seeds`` gave it."""
    for folder in (spec.folder_of(cell), spec.old_folder_of(cell)):
        path = Path(spec.output_dir) / "cells" / folder / RESULT
        if path.is_file():
            return {"seed": cell.seed, **json.loads(path.read_text())}
    return None


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
    resume a sweep of another base there. Other K, methods or seeds add cells (a finished cell is
    kept and only the new ones run); a cell whose settings changed gets a new folder (its
    fingerprint) instead of a finished cell's result."""
    runtime.same_job_or_refuse(out, SWEEP_FILE, {"experiment": spec.experiment, "overrides": spec.experiment_overrides,
                                                 "budget": spec.budget}, "sweep")


def _sweep(spec: SweepSpec, address: str | None) -> list[dict]:
    out = Path(spec.output_dir)
    _same_sweep(spec, out)
    base = spec.base()
    tracking.check_server(base.tracking)
    runtime.start_ray(address)
    out.mkdir(parents=True, exist_ok=True)
    # The store exists before any cell could touch it, with the sweep's run that the cells' runs nest under.
    parent = _sweep_run(base, out)
    cells = spec.cells()
    todo = [c for c in cells if read_result(spec, c) is None]
    at_once = concurrency(base)
    print(f"[scale] {len(cells)} cells (K = {', '.join(map(str, spec.categories))} x {', '.join(spec.methods)} x "
          f"seed {', '.join(map(str, spec.seeds))}), "
          f"budget {spec.budget}; {len(cells) - len(todo)} done before, {len(todo)} to run, {at_once} at a time",
          flush=True)
    failed: dict[str, str] = {}
    pending: dict = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < at_once:
            cell = queue.pop(0)
            pending[cell_task.remote(spec, cell, parent.run_id)] = cell
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
    rows = _results(spec, base, results, out) if results else []
    if failed:
        raise SystemExit(f"[scale] {len(failed)} of {len(cells)} cells failed ({', '.join(failed)}): run the same "
                         "command to redo only those")
    return rows


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _trained_by_gradient(method: str) -> bool:
    return getattr(model_class(method), "trained_by_gradient", True)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(float(value))


def _cell_row(r: dict, anchors: list[str]) -> dict:
    """One cell's (one seed's) values: each metric's mean and standard deviation over its categories,
    the anchor categories' mean, and its cost (``steps`` only for a method trained by gradient)."""
    per = r["per_category"]
    row = {"K": r["K"], "method": r["method"], "seed": r.get("seed"),
           "steps": r["steps"] if _trained_by_gradient(r["method"]) else None}
    for metric in METRICS:
        row[f"{metric}_mean"], row[f"{metric}_std"] = spread([v.get(metric) for v in per.values()])
    for metric in ANCHOR_METRICS:
        row[f"anchor_{metric}"] = spread([per[c].get(metric) for c in anchors if c in per])[0]
    row.update({k: r.get(k) for k in COSTS})
    return row


def _over_seeds(values: list):
    """A cost over seeds: the value they share, else their mean; ``None`` when no seed has one."""
    kept = [v for v in values if _number(v)]
    if not kept:
        return None
    return kept[0] if all(v == kept[0] for v in kept) else sum(kept) / len(kept)


def _band(values: list) -> tuple[float, float | None, float | None]:
    """Mean, min and max over seeds of the values that are numbers; no band (``None``) below two."""
    kept = [float(v) for v in values if _number(v)]
    if not kept:
        return math.nan, None, None
    mean = sum(kept) / len(kept)
    return (mean, min(kept), max(kept)) if len(kept) > 1 else (mean, None, None)


def _rows(spec: SweepSpec, results: list[dict]) -> list[dict]:
    """A row per (method, K) of the cells that finished: each accuracy value's mean over the seeds
    with their min..max (``<value>_seed_min``/``_seed_max``, ``None`` with one seed), the categories'
    standard deviation averaged over the seeds, and each cost over the seeds (:func:`_over_seeds`)."""
    anchors = spec.anchors()
    cells = [_cell_row(r, anchors) for r in results]
    order = {m: i for i, m in enumerate(spec.methods)}
    rows = []
    for method, k in sorted({(c["method"], c["K"]) for c in cells}, key=lambda mk: (order.get(mk[0], 99), mk[1])):
        group = [c for c in cells if (c["method"], c["K"]) == (method, k)]
        row = {"K": k, "method": method, "seeds": len(group), "anchor_categories": len(anchors)}
        for key in ("steps", *COSTS):
            row[key] = _over_seeds([c[key] for c in group])
        for column, prefix in BANDED:
            row[column], row[f"{prefix}_seed_min"], row[f"{prefix}_seed_max"] = _band([c[column] for c in group])
        for metric in METRICS:
            row[f"{metric}_std"] = spread([c[f"{metric}_std"] for c in group])[0]
        rows.append(row)
    return rows


def _drops(spec: SweepSpec, results: list[dict]) -> dict[str, dict]:
    """Per method, how far the anchor categories' mean image and pixel AUROC fall from its smallest to
    its largest finished K (categories every K holds, so both means cover the same ones): the drop of
    each seed finished at both, then their mean and min..max (``None`` with one seed)."""
    anchors = spec.anchors()
    drops = {}
    for method in spec.methods:
        cells = {(r["K"], r.get("seed")): _cell_row(r, anchors) for r in results if r["method"] == method}
        if not cells:
            continue
        low, high = min(k for k, _ in cells), max(k for k, _ in cells)
        seeds = [s for s in spec.seeds if (low, s) in cells and (high, s) in cells]
        entry = {"K_from": low, "K_to": high, "seeds": len(seeds)}
        for metric in ANCHOR_METRICS:
            column = f"anchor_{metric}"
            entry[metric], entry[f"{metric}_seed_min"], entry[f"{metric}_seed_max"] = _band(
                [cells[(low, s)][column] - cells[(high, s)][column] for s in seeds])
        drops[method] = entry
    return drops


def _plain(value):
    """``value`` for JSON: nan as ``None``."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _seeds_text(row: dict, prefix: str) -> str:
    if row[f"{prefix}_seed_min"] is None:
        return f"({row['seeds']} seed{'s' if row['seeds'] != 1 else ''}: no band)"
    return f"[{row[f'{prefix}_seed_min']:.3f}..{row[f'{prefix}_seed_max']:.3f} over {row['seeds']} seeds]"


def _spent(row: dict) -> str:
    steps = f"{row['steps']} steps, " if row["steps"] is not None else ""
    bank = f", a bank of {row['bank_patches']} patches" if row["bank_patches"] is not None else ""
    return f"{steps}train {_fmt0(row['train_s'])} s, {_fmt0(row['images_seen'])} training images seen{bank}"


def _results(spec: SweepSpec, base, results: list[dict], out: Path) -> list[dict]:
    """Write ``scaling.csv``, ``scaling.json`` and the figures, log them; returns the CSV's rows."""
    rows, drops, anchors = _rows(spec, results), _drops(spec, results), spec.anchors()
    write_csv_atomic(out / "scaling.csv", rows, COLUMNS)
    write_json_atomic(out / SUMMARY, _plain({"seeds": spec.seeds, "band": BAND, "anchor_categories": anchors,
                                             "rows": rows, "anchor_auroc_drop": drops}))
    print(f"[scale] {out / 'scaling.csv'} (a row per method and K, means over the seeds; band: {BAND}):")
    for row in rows:
        print(f"  K={row['K']:>4} {row['method']:>8}: image AUROC {_fmt(row['image_auroc_mean'])} "
              f"{_seeds_text(row, 'image_auroc')}, anchors {_fmt(row['anchor_image_auroc'])}; {_spent(row)}",
              flush=True)
    for method, d in drops.items():
        print(f"[scale] {method}: image AUROC of the {len(anchors)} anchor categories falls by "
              f"{_fmt(d['image_auroc'])} from K={d['K_from']} to K={d['K_to']} (pixel: {_fmt(d['pixel_auroc'])}; "
              f"{d['seeds']} seed{'s' if d['seeds'] != 1 else ''})", flush=True)
    figures = _figures(spec, rows, drops, results, out / "figures")
    _log(spec, base, [_cell_row(r, anchors) for r in results], out, [out / "scaling.csv", out / SUMMARY, *figures])
    return rows


def _fmt0(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _by_method(spec: SweepSpec, rows: list[dict]) -> dict[str, list[dict]]:
    grouped = {m: sorted((r for r in rows if r["method"] == m), key=lambda r: r["K"]) for m in spec.methods}
    return {m: g for m, g in grouped.items() if g}


def _log_k_axis(ax, spec: SweepSpec) -> None:
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(spec.categories, [str(k) for k in spec.categories])
    ax.set_xlabel("categories K")


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def _figures(spec: SweepSpec, rows: list[dict], drops: dict, results: list[dict], folder: Path) -> list[Path]:
    """AUROC against K (mean over seeds; band: the seeds' min..max; dashed: the anchor categories),
    per-category AUROC as a box per K, cost against K, and each method's anchor AUROC drop from its
    smallest to its largest K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    grouped = _by_method(spec, rows)
    anchors = len(spec.anchors())
    seeds = len(spec.seeds)
    paths = []

    def save(fig, name: str, rect=(0, 0, 1, 1)) -> None:
        fig.tight_layout(rect=rect)
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        paths.append(folder / name)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("image_auroc", "pixel_auroc"), strict=True):
        for method, group in grouped.items():
            ks = [r["K"] for r in group]
            line, = ax.plot(ks, [r[f"{metric}_mean"] for r in group], marker="o", label=method)
            low = [_nan(r[f"{metric}_seed_min"]) for r in group]
            high = [_nan(r[f"{metric}_seed_max"]) for r in group]
            if not all(math.isnan(v) for v in low):  # no band from one seed
                ax.fill_between(ks, low, high, color=line.get_color(), alpha=0.15)
            ax.plot(ks, [r[f"anchor_{metric}"] for r in group], ls="--", color=line.get_color(), lw=1)
        _log_k_axis(ax, spec)
        ax.set_ylabel(metric.replace("_", " ").replace("auroc", "AUROC"))
        ax.set_title("mean of categories and seeds; band: seeds' min..max" if seeds > 1 else
                     "mean over categories; one seed: no band", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title=f"method (dashed: the {anchors} anchor categories)", fontsize=8,
               title_fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    save(fig, "auroc_vs_categories.png", rect=(0, 0.1, 1, 1))

    fig, axes = plt.subplots(1, len(grouped), figsize=(3.6 * len(grouped), 3.2), squeeze=False)
    for ax, method in zip(axes[0], grouped, strict=True):
        ks = sorted({r["K"] for r in results if r["method"] == method})
        boxes = []
        for k in ks:  # each category's image AUROC, averaged over the seeds
            per_seed = [r["per_category"] for r in results if r["method"] == method and r["K"] == k]
            boxes.append([v for v in (spread([p.get(c, {}).get("image_auroc") for p in per_seed])[0]
                                      for c in per_seed[0]) if not math.isnan(v)])
        ax.boxplot(boxes, tick_labels=[str(k) for k in ks])
        ax.set_title(method if seeds == 1 else f"{method} (mean over seeds)")
        ax.set_xlabel("categories K")
        ax.set_ylabel("per-category image AUROC")
    save(fig, "per_category_auroc.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for method, group in grouped.items():
        ks = [r["K"] for r in group]
        for ax, key in zip(axes, ("train_s", "images_seen", "worker_peak_rss_mb"), strict=True):
            ax.plot(ks, [_nan(r[key]) for r in group], marker="o", label=method)
    labels = ("training time (s)", "training images seen (knn: one pass)", "peak worker memory, rank 0 (MB RSS)")
    for ax, label in zip(axes, labels, strict=True):
        _log_k_axis(ax, spec)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    save(fig, "cost_vs_categories.png")

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    methods = list(drops)
    x = np.arange(len(methods))
    for offset, metric in ((-0.2, "image_auroc"), (0.2, "pixel_auroc")):
        means = [_nan(drops[m][metric]) for m in methods]
        low = [_nan(drops[m][f"{metric}_seed_min"]) for m in methods]
        high = [_nan(drops[m][f"{metric}_seed_max"]) for m in methods]
        errors = np.array([[mean - lo, hi - mean] for mean, lo, hi in zip(means, low, high, strict=True)]).T
        ax.bar(x + offset, means, width=0.4, label=metric.replace("_", " "),
               yerr=None if np.isnan(errors).all() else np.nan_to_num(errors), capsize=3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(x, [f"{m}\nK {drops[m]['K_from']}→{drops[m]['K_to']}" for m in methods])
    ax.set_ylabel("drop in mean AUROC")
    ax.set_title(f"mean over the {anchors} anchor categories every K holds (scaling.json names them)\n"
                 + ("error bars: min..max over the seeds" if seeds > 1 else "one seed: no error bars"), fontsize=8)
    ax.legend(fontsize=8)
    save(fig, "auroc_drop.png")
    return paths


def _sweep_run(base, out: Path) -> tracking.RunRef:
    """The sweep's MLflow run (created once, ``out/mlflow_run_id``; a rerun reopens it)."""
    return tracking.open_job_run(base.tracking, f"scale {out.name}", out / "mlflow_run_id",
                                 tags={"anomdiff.job": "scale"})


def _log(spec: SweepSpec, base, cells: list[dict], out: Path, files: list[Path]) -> None:
    """The sweep's parent run: its summary and a nested child run per cell (per seed; beside the
    cells' own training and evaluation runs), logged from the driver only."""
    ref = _sweep_run(base, out)
    with tracking.resume(ref) as active:
        if active is None:
            return
        if not mlflow.get_run(ref.run_id).data.params:
            mlflow.log_params({"experiment": spec.experiment, "categories": json.dumps(spec.categories),
                               "methods": json.dumps(spec.methods), "budget": spec.budget,
                               "seeds": json.dumps(spec.seeds),
                               "overrides": json.dumps(spec.experiment_overrides)[:6000]})
        logged = {r.data.tags.get("anomdiff.cell") for r in mlflow.search_runs(
            filter_string=f"tags.mlflow.parentRunId = '{ref.run_id}'", output_format="list")}
        for row in cells:
            name = Cell(row["K"], row["method"], row["seed"]).name
            if name in logged:  # a rerun logs only the cells it has not logged
                continue
            with mlflow.start_run(run_name=name, nested=True):
                mlflow.set_tags({"anomdiff.cell": name})
                mlflow.log_params({k: row[k] for k in ("K", "method", "seed", "steps") if row[k] is not None})
                mlflow.log_metrics({k: float(v) for k, v in row.items() if k not in ("K", "method", "seed", "steps")
                                    and _number(v)})
        for path in files:
            tracking.log_artifact(path, "scaling")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff scale", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a sweep file (conf/scale/)")
    parser.add_argument("overrides", nargs="*", help="experiment=, categories=[K,...], methods=[...], budget=, "
                                                     "seeds=[S,...], output_dir=; any other dotted key=value applies "
                                                     "to the base experiment of every cell (data.path=DATA, "
                                                     "train.steps=100)")
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
