"""Evaluate an exported model on a dataset's test split: metrics document, report, MLflow.

    python -m pipelines.evaluate .anomdiff/demo/run/model .anomdiff/demo/data --json metrics.json
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.evaluate /runs/x/model /data/realiad evaluate.batch_size=32 scorers=8 use_gpu=true

Ray Data streams the test shards through a pool of scoring actors (each loads the model once). On
the default streaming path each actor folds its batches' maps into streaming metrics and sends the
driver only those partial metrics and the worst cases it newly keeps, so the driver's work and
memory do not grow with the pixels; ``evaluate.streaming=false`` (exact metrics) ships every map.
Overrides: ``evaluate.*`` keys, inference keys of the model (``model.diffusion.ddim_steps=...``),
``scorers`` and ``use_gpu`` (default: the scorers use GPUs when the cluster has them).

The report folder gets ``metrics.json`` (with ``at_threshold``: precision, recall and F1 of the
decisions at the exported threshold), ``metrics.md``, figures and ``images.csv`` (a row per test
image: sample id, category, label, score, decision); ``evaluate.save_maps=true`` also writes every
anomaly map to ``maps/``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import pickle
import re
from pathlib import Path
from urllib.parse import quote

import mlflow
import numpy as np
import ray
import ray.data

from anomdiff import metrics, report
from anomdiff.atomic import atomic_path, write_csv_atomic, write_json_atomic
from anomdiff.config import DataConfig, EvaluateConfig, TrackingConfig
from anomdiff.lock import hold_folder
from anomdiff.models.config import ModelConfig
from pipelines import registry, runtime, tracking
from pipelines.data import DataSpec, test_dataset
from pipelines.registry import ResolvedModel

JOB_KEYS = ("scorers", "use_gpu")
SECTIONS = ("evaluate", "tracking", "model")

THUMBNAIL = 128


class Scorer:
    """Ray Data actor: loads the model once and scores decoded batches. With ``fold`` (the streaming
    path: ``score_range``, ``num_bins``, ``worst_cases``, ``categories``) it folds each batch into
    streaming metrics itself and returns one row per batch, its partial metrics and the worst cases
    it has newly admitted, so full-resolution maps never leave the actor; without, one row per image."""

    def __init__(self, model_dir: str, model_overrides: dict, use_gpu: bool, fold: dict | None = None,
                 maps_dir: str | None = None):
        import torch

        from anomdiff.models import load_model

        self.torch = torch
        self.device = "cuda" if use_gpu else "cpu"
        self.model = load_model(model_dir, device=self.device)
        if model_overrides:
            self.model.cfg = ModelConfig.from_dict(model_overrides, base=self.model.cfg)
        self.fold = fold
        self.worst = WorstCases(fold["worst_cases"]) if fold else None
        self.maps_dir = Path(maps_dir) if maps_dir else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        inputs = {"image": torch.tensor(batch["image"], device=self.device)}
        if self.model.cfg.conditioning == "category_aware":  # the unified protocol never tells the model
            inputs["category_index"] = torch.tensor(batch["category_index"], device=self.device)
        out = self.model.score(inputs)
        images = ((batch["image"].transpose(0, 2, 3, 1) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        stride = max(1, images.shape[1] // THUMBNAIL)
        scored = {
            "sample_id": batch["sample_id"],
            "category_index": batch["category_index"],
            "label": batch["label"],
            "image_score": out["image_score"].float().cpu().numpy(),
            "anomaly_map": out["anomaly_map"].float().cpu().numpy(),
            "mask": batch["mask"][:, 0].astype(np.uint8),
            "thumbnail": images[:, ::stride, ::stride],
        }
        if self.maps_dir is not None:
            for sample_id, anomaly_map in zip(scored["sample_id"], scored["anomaly_map"], strict=True):
                with atomic_path(self.maps_dir / map_file(sample_id)) as tmp, open(tmp, "wb") as f:
                    np.save(f, anomaly_map.astype(np.float16))
        if self.fold is None:
            return scored
        categories = self.fold["categories"]
        partial = metrics.StreamingMetrics(score_range=tuple(self.fold["score_range"]),
                                           num_bins=self.fold["num_bins"])
        partial.update(np.array([categories[i] for i in scored["category_index"]]), scored["image_score"],
                       scored["label"], scored["anomaly_map"], scored["mask"])
        admitted = self.worst.offer(scored, categories)
        rows = image_rows(scored, categories)
        return {"images": np.array([len(scored["label"])]),
                "partial": np.array([pickle.dumps(partial)], dtype=object),
                "cases": np.array([pickle.dumps(admitted)], dtype=object),
                "rows": np.array([json.dumps(rows)], dtype=object)}


def map_file(sample_id: str) -> str:
    """The file name of a sample's saved anomaly map (``evaluate.save_maps``): the sample id
    URI-encoded, so distinct ids (any script, any separator) never share a file."""
    return quote(str(sample_id), safe="") + ".npy"


def image_rows(scored: dict, categories: list[str]) -> list[dict]:
    """One row per scored image: sample id, category, label, image score."""
    return [{"sample_id": str(sid), "category": categories[int(c)], "label": int(label), "score": float(score)}
            for sid, c, label, score in zip(scored["sample_id"], scored["category_index"], scored["label"],
                                            scored["image_score"], strict=True)]


def write_image_table(out: Path, rows: list[dict], threshold: float | None, maps: bool) -> Path:
    """``images.csv``: a row per test image (sample id, category, label, score, decision at the exported
    threshold, and the saved map's file with ``evaluate.save_maps``), sorted by category and sample."""
    table = []
    for row in sorted(rows, key=lambda r: (r["category"], r["sample_id"])):
        decision = "" if threshold is None else str(row["score"] >= threshold).lower()
        table.append({**row, "decision": decision, **({"map": f"maps/{map_file(row['sample_id'])}"} if maps else {})})
    columns = ["sample_id", "category", "label", "score", "decision", *(["map"] if maps else [])]
    return write_csv_atomic(out / "images.csv", table, columns)


class WorstCases:
    """The ``k`` highest-scored normals and ``k`` lowest-scored anomalies seen so far (bounded heaps)."""

    def __init__(self, k: int):
        self.k, self.normal, self.anomalous, self.counter = k, [], [], 0

    def _admits(self, score: float, label: int) -> bool:
        heap = self.anomalous if label else self.normal
        return self.k > 0 and (len(heap) < self.k or (-score if label else score) > heap[0][0])

    def add(self, case: report.Case) -> bool:
        """Keep ``case`` if it is among the worst so far; returns whether it was kept."""
        if not self._admits(case.score, case.label):
            return False
        heap = self.anomalous if case.label else self.normal
        self.counter += 1
        entry = (-case.score if case.label else case.score, self.counter, case)
        (heapq.heappush if len(heap) < self.k else heapq.heapreplace)(heap, entry)
        return True

    def offer(self, batch: dict, categories: list[str]) -> list[report.Case]:
        """Offer a scored batch's images; returns the cases kept (built only for those)."""
        kept = []
        for i, score in enumerate(batch["image_score"]):
            label = int(batch["label"][i])
            if not self._admits(float(score), label):
                continue
            case = report.Case(batch["thumbnail"][i], batch["anomaly_map"][i], batch["mask"][i] if label else None,
                               float(score), label, categories[int(batch["category_index"][i])],
                               str(batch["sample_id"][i]))
            if self.add(case):
                kept.append(case)
        return kept

    def cases(self) -> list[report.Case]:
        return [c for _, _, c in sorted(self.normal, reverse=True)] + [c for _, _, c in sorted(self.anomalous,
                                                                                                 reverse=True)]


def evaluate(model: str, data_path: str, out_dir: str | None = None, overrides: list[str] = (),
             address: str | None = None) -> dict:
    """Score the test split of ``data_path`` with ``model`` (an exported folder, or ``models:/NAME@alias``,
    ``models:/NAME/VERSION``, ``runs:/RUN/model``) on the Ray that ``address`` names
    (``pipelines.runtime.start_ray``); returns the metrics document. One evaluation at a time writes
    into a report folder (``anomdiff.lock``)."""
    out = report_folder(model, out_dir)
    with hold_folder(out):
        return _evaluate(model, data_path, out, list(overrides), address)


def _evaluate(model: str, data_path: str, out: Path, overrides: list[str], address: str | None) -> dict:
    from anomdiff.models import load_model
    from anomdiff.models.saved import read_saved_config

    own, rest = runtime.split_overrides(list(overrides), JOB_KEYS)
    sections = runtime.override_sections(rest, SECTIONS, "evaluate")
    eval_cfg = EvaluateConfig.from_dict(sections.get("evaluate", {}), _path="evaluate")
    tracking_cfg = TrackingConfig.from_dict(sections.get("tracking", {}), _path="tracking")
    model_overrides, scorers = sections.get("model", {}), int(own.get("scorers", 1))
    use_gpu = own.get("use_gpu", "auto")  # auto: the scorers take a GPU each when the cluster has GPUs
    if "conditioning" in model_overrides or "method" in model_overrides:
        raise ValueError("model.conditioning and model.method are fixed when a model is trained; "
                         "evaluate takes inference keys of model.* only")
    tracking.check_server(tracking_cfg)
    source = _model_source(model, out, tracking_cfg)
    model_dir = str(source.folder)
    saved = read_saved_config(model_dir)
    meta = saved.get("metadata", {})
    categories = meta.get("categories")
    if not categories:
        raise ValueError(f"{model_dir}: the model lists no categories (was it exported by anomdiff train?)")
    # Loaded once here, before Ray: a damaged model or a bad override fails now, with one line, not
    # inside every scoring actor.
    ModelConfig.from_dict(model_overrides, base=load_model(model_dir).cfg)
    spec = DataSpec.open(DataConfig(path=str(data_path)), saved["config"]["image_size"], eval_cfg.batch_size)
    evaluated = [c for c in categories if c in spec.manifest["counts"]]
    if not evaluated:
        raise ValueError(f"{data_path} has none of the model's {len(categories)} categories")

    score_range = tuple(meta["score_range"]) if eval_cfg.streaming and meta.get("score_range") else None
    # Streaming: the scoring actors fold their maps into metrics; exact: every map comes here.
    fold = {"score_range": score_range, "num_bins": eval_cfg.num_bins, "worst_cases": eval_cfg.worst_cases,
            "categories": categories} if score_range else None
    runtime.start_ray(address)
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1 if use_gpu == "auto" else bool(use_gpu)
    scored = test_dataset(spec, categories=categories, subset=evaluated).map_batches(
        Scorer, fn_constructor_kwargs={"model_dir": str(model_dir), "model_overrides": model_overrides,
                                       "use_gpu": use_gpu, "fold": fold,
                                       "maps_dir": str((out / "maps").resolve()) if eval_cfg.save_maps else None},
        batch_size=eval_cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=scorers),
        num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else 0.5)

    accumulator = metrics.StreamingMetrics(score_range=score_range, num_bins=eval_cfg.num_bins) if fold else None
    exact: dict[str, list] = {"categories": [], "scores": [], "labels": [], "maps": [], "masks": []}
    worst = WorstCases(eval_cfg.worst_cases)
    rows: list[dict] = []
    seen = 0
    if fold:
        for part in scored.iter_rows():
            accumulator.merge(pickle.loads(part["partial"]))  # our own actors' objects, not user input
            for case in pickle.loads(part["cases"]):
                worst.add(case)
            rows += json.loads(part["rows"])
            seen += int(part["images"])
            print(f"[evaluate] scored {seen} images", flush=True)
        doc, curves = accumulator.compute(), accumulator.curves()
    else:
        for batch in scored.iter_batches(batch_size=eval_cfg.batch_size, batch_format="numpy"):
            names = np.array([categories[i] for i in batch["category_index"]])
            for key, value in zip(exact, (names, batch["image_score"], batch["label"], batch["anomaly_map"],
                                          batch["mask"]), strict=True):
                exact[key].append(value)
            worst.offer(batch, categories)
            rows += image_rows(batch, categories)
            seen += len(names)
            print(f"[evaluate] scored {seen} images", flush=True)
        arrays = {k: np.concatenate(v) for k, v in exact.items()}
        args = (arrays["categories"], arrays["scores"], arrays["labels"], arrays["maps"], arrays["masks"])
        doc, curves = metrics.compute(*args), metrics.compute_curves(*args)

    doc = {"num_images": doc["num_images"], "protocol": protocol(saved["config"]), **doc}
    threshold = meta.get("threshold")
    if threshold is not None:  # the decisions the exported model makes, at the threshold validation chose
        doc["at_threshold"] = metrics.at_threshold([r["category"] for r in rows], [r["score"] for r in rows],
                                                   [r["label"] for r in rows], threshold)
    write_image_table(out, rows, threshold, eval_cfg.save_maps)
    files = report.write_report(doc, out, curves=curves, worst_cases=worst.cases(),
                                title=f"{meta.get('experiment', 'model')} on {Path(data_path).name}")
    # The version's test metrics are the model's own: every category, its own settings.
    _log(doc, out, tracking_cfg, source, data_path, link=not model_overrides and evaluated == list(categories))
    print((out / "metrics.md").read_text())
    print(f"report: {out} ({', '.join(sorted(p.name for p in files.values()))})")
    return doc


def protocol(model_config: dict) -> str:
    """The evaluation protocol of a saved model's config: its ``conditioning``."""
    return model_config["conditioning"]


def report_folder(model: str, out_dir: str | None) -> Path:
    """Where an evaluation of ``model`` writes: ``out_dir``; by default next to an exported folder
    (``evaluation/``), or under ANOMDIFF_HOME for a registry or run URI."""
    if out_dir:
        return Path(out_dir)
    if not model.startswith(("models:/", "runs:/")):
        return Path(model).parent / "evaluation"
    return tracking.anomdiff_home() / "evaluations" / re.sub(r"[^A-Za-z0-9_.-]+", "-", model)


def _model_source(model: str, out: Path, tracking_cfg: TrackingConfig) -> ResolvedModel:
    """The model: an exported folder is read where it is; a registry or run URI is copied into the
    report folder (``model/``), where scoring actors on other nodes find it when the folder is on
    shared storage."""
    if not model.startswith(("models:/", "runs:/")):
        return registry.resolve(model)
    tracking.use_experiment(tracking_cfg)
    return registry.resolve(model, download_to=out / "model")


def _log(doc: dict, out: Path, tracking_cfg: TrackingConfig, source: ResolvedModel, data_path: str,
         link: bool = True) -> None:
    """The evaluation's own MLflow run, linked to the training run that produced the model and, with
    ``link`` (the model's own settings on all its categories), to the registered versions of it,
    which get its test metrics as tags (what the promotion gate reads)."""
    model_dir, data_path = source.folder.resolve(), Path(data_path).resolve()
    tags = {"anomdiff.job": "evaluate", "anomdiff.model_dir": str(model_dir), "anomdiff.data_path": str(data_path)}
    if source.training_run:
        tags["anomdiff.training_run"] = source.training_run
    ref = tracking.open_job_run(tracking_cfg, f"evaluate {source.name or model_dir.parent.name}", tags=tags)
    with tracking.resume(ref) as active:
        mlflow.log_params({"model_dir": str(model_dir), "data.path": str(data_path)})
        report.log_to_mlflow(doc, out)
        if active is not None and link:
            versions = registry.link_evaluation(source, doc, ref.run_id, str(data_path))
            if versions:
                mlflow.set_tag("anomdiff.model_versions", ",".join(versions))
                print(f"test metrics recorded on model version {', '.join(versions)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an exported model folder (output_dir/model), models:/NAME@ALIAS, "
                                      "models:/NAME/VERSION or runs:/RUN_ID/model")
    parser.add_argument("data", help="a converted dataset")
    parser.add_argument("--json", dest="json_out", help="also write the metrics document here")
    parser.add_argument("--out", help="report folder (default: next to the model, evaluation/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides: evaluate.*, tracking.*, inference keys "
                                                     "of model.*, scorers=N, use_gpu=true|false (default: "
                                                     "a GPU per scorer when the cluster has GPUs)")
    runtime.add_address_argument(parser)
    args = parser.parse_intermixed_args(argv)
    doc = evaluate(args.model, args.data, args.out, args.overrides, args.address)
    if args.json_out:
        write_json_atomic(args.json_out, doc)
        print(json.dumps(doc["mean"]))


if __name__ == "__main__":
    main()
