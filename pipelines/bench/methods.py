"""The optional ``methods`` section: every method trained and evaluated at the demo's budget, under
the default (label-free) protocol, on the demo's synthetic dataset and on the real-photograph
benchmark; and ``proad_ablation``: Pro-AD with each of its three ideas taken away in turn, at the
same budget (minutes per row; run only when named in ``--sections``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from anomdiff.config import load_config
from pipelines.bench.measure import ratio, torch_threads

METHODS = ("knn", "diad", "dpdiff", "proad", "drdc")
PROAD_ABLATION = {  # row -> the overrides that make it (Pro-AD's ideas 3, 2 and 1 taken away in turn)
    "proad": ("model.method=proad",),
    "proad_no_constraint": ("model.method=proad", "model.proad.constraint=false"),
    "proad_one_way": ("model.method=proad", "model.proad.bidirectional=false"),
    "proad_few_prototypes": ("model.method=proad", "model.proad.num_prototypes=6"),  # INP-Former's count
}
DATASETS = ("synthetic", "photos")
# Per-method settings chosen by measurement (docs/quality.md): PatchCore's patch grid at 64 px is
# 16 x 16 and too coarse for real photographs; the images are upsampled to 128 px for it.
METHOD_OVERRIDES = {"knn": ("model.image_size=128",)}
SCORED_IMAGES = 32


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


def make_dataset(name: str, root: Path, num_categories: int) -> Path:
    """The demo's synthetic dataset (``num_categories`` at 64 px, seed 0, as ``anomdiff demo``), or
    the real-photograph benchmark (every category, 64 px), converted."""
    from anomdiff.data.convert import convert
    from anomdiff.data.photos import make_photo_benchmark
    from anomdiff.data.synthetic import synthesize

    data = root / name
    if name == "synthetic":
        synthesize(data, num_categories, seed=0, image_size=64)
    elif name == "photos":
        make_photo_benchmark(root / "photos-src", seed=0, image_size=64)
        convert(root / "photos-src", data, "mvtec", image_size=64)
    else:
        raise ValueError(f"unknown methods dataset {name!r}; choose from {', '.join(DATASETS)}")
    return data


def scoring_images_per_s(model_dir: Path, data: Path, images: int = SCORED_IMAGES, batch: int = 8,
                         overrides: dict | None = None) -> float:
    """Test images scored per second by ``model.score`` in this process at one torch thread (what a
    scoring actor of ``pipelines.evaluate`` gets), after one unmeasured batch; ``overrides``: inference
    keys of the method's own config section (``{"gamma": 0}`` for ``model.drdc.gamma``)."""
    import pyarrow as pa
    import torch

    from anomdiff.data.manifest import read_manifest, shard_paths
    from anomdiff.data.schema import read_shard
    from anomdiff.data.transforms import COLUMNS, DecodeBatch
    from anomdiff.models import load_model

    model = load_model(model_dir)
    if overrides:
        from anomdiff.models.config import ModelConfig

        model.cfg = ModelConfig.from_dict({model.method: overrides}, base=model.cfg)
    manifest = read_manifest(data)
    rows = pa.concat_tables([read_shard(p, columns=list(COLUMNS)) for p in shard_paths(data, manifest, "test")])
    decode = DecodeBatch(model.cfg.image_size, model.metadata["categories"])
    batches = [torch.from_numpy(decode(rows.slice(o, batch))["image"]) for o in range(0, images + batch, batch)]
    with torch_threads(1):
        model.score({"image": batches[0]})
        tick = time.perf_counter()
        for x in batches[1:]:
            model.score({"image": x})
        seconds = time.perf_counter() - tick
    return sum(len(x) for x in batches[1:]) / seconds


def methods_section(work: Path, methods: tuple[str, ...] = METHODS, datasets: tuple[str, ...] = DATASETS,
                    num_categories: int = 8, variants: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Every method at the same budget: ``conf/experiment/demo.yaml`` (steps, workers, ZeRO stage,
    seed) with only ``model.method`` changed, trained by ``pipelines.train`` and evaluated by
    ``pipelines.evaluate`` on each dataset's test split (the exported model is the checkpoint chosen
    on validation, never on test). ``variants`` adds rows: a name and the overrides (``model.method``
    among them) that make it, for ablations."""
    from anomdiff.config import CONF_DIR
    from anomdiff.models import load_model, model_class
    from pipelines import evaluate, train

    out: dict = {"experiment": "demo", "protocol": "label_free"}
    for name in datasets:
        data = make_dataset(name, work / "data", num_categories)
        rows: dict = {}
        runs = {method: (f"model.method={method}", *METHOD_OVERRIDES.get(method, ())) for method in methods} \
            | (variants or {})
        for method, overrides in runs.items():
            run_dir = work / name / method
            cfg = load_config(CONF_DIR / "experiment" / "demo.yaml",
                              [f"data.path={data}", f"output_dir={run_dir}", *overrides,
                               "tracking.experiment=anomdiff-bench-methods"])
            tick = time.perf_counter()
            train.run(cfg)
            train_s = time.perf_counter() - tick
            doc = evaluate.evaluate(str(run_dir / "model"), str(data), str(run_dir / "evaluation"),
                                    ["tracking.experiment=anomdiff-bench-methods"])
            kind = model_class(cfg.model.method)
            trained = getattr(kind, "trained_by_gradient", True)
            stages = load_model(run_dir / "model").stages  # an instance's own: drdc in pixel space has no vae
            steps_per_s = _denoiser_steps_per_s(run_dir) if trained else None
            rows[method] = {**{k: doc["mean"][k] for k in ("image_auroc", "pixel_auroc", "aupro")},
                            "protocol": doc["protocol"], "train_s": train_s,
                            "scoring_images_per_s": scoring_images_per_s(run_dir / "model", data),
                            "denoiser_step_s": 1 / steps_per_s if steps_per_s else None,
                            "steps": cfg.train.steps if trained else 0,
                            "vae_steps": cfg.train.vae_steps if "vae" in stages else 0}
            print(f"[bench] {name} / {method}: image AUROC {doc['mean']['image_auroc']:.3f}, pixel AUROC "
                  f"{doc['mean']['pixel_auroc']:.3f}, AUPRO {doc['mean']['aupro']:.3f}, trained in {train_s:.0f} s",
                  flush=True)
        if "diad" in rows:
            for row in rows.values():
                row["step_ratio_over_diad"] = ratio(row["denoiser_step_s"], rows["diad"]["denoiser_step_s"])
        out[name] = {"categories": len(doc["per_category"]), **rows}
    return out
