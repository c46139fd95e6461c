import json

import mlflow
import numpy as np
import pytest
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from anomdiff import metrics, report
from anomdiff.atomic import write_json_atomic
from anomdiff.metrics import METRIC_KEYS
from anomdiff.report import Case


def _doc(image_aurocs: dict, with_pixels: bool = True) -> dict:
    per_category = {}
    for cat, auroc in image_aurocs.items():
        row = dict.fromkeys(METRIC_KEYS, None)
        if auroc is not None:
            row.update(image_auroc=auroc, image_ap=auroc - 0.05, image_f1max=auroc - 0.1)
            if with_pixels:
                row.update(pixel_auroc=0.9, pixel_ap=0.4, pixel_f1max=0.45, aupro=0.8)
        per_category[cat] = row
    mean = {}
    for key in METRIC_KEYS:
        defined = [row[key] for row in per_category.values() if row[key] is not None]
        mean[key] = float(np.mean(defined)) if defined else None
    return {"num_images": 10 * len(per_category), "mean": mean, "per_category": per_category}


DOC = _doc({"bottle": 0.99, "cable": 0.62, "capsule": 0.81, "carpet": 0.95, "grid": 0.70,
            "hazelnut": 0.88, "leather": 0.999, "screw": None})


def _evaluation(seed=0, n=12, size=32):
    rng = np.random.default_rng(seed)
    cats = np.array(["bottle", "cable"] * (n // 2))
    labels = np.array([0, 0, 1, 1] * (n // 4))
    masks = np.zeros((n, size, size), dtype=np.uint8)
    masks[labels == 1, 10:20, 8:16] = 255
    maps = rng.random((n, size, size)).astype(np.float32) + (masks > 0)
    scores = maps.reshape(n, -1).max(axis=1) + rng.normal(scale=0.3, size=n)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return cats, scores, labels, maps, masks, images


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).ndim == 3


def test_metrics_json_round_trips_the_document_and_leaves_no_temp_files(tmp_path):
    written = report.write_report(DOC, tmp_path)
    assert json.loads(written["metrics.json"].read_text()) == DOC
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_json_with_nan_is_refused_and_the_old_file_kept(tmp_path):
    path = write_json_atomic(tmp_path / "metrics.json", DOC)
    bad = {**DOC, "mean": {**DOC["mean"], "image_auroc": float("nan")}}
    with pytest.raises(ValueError):
        write_json_atomic(path, bad)
    assert json.loads(path.read_text()) == DOC
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_markdown_lists_the_best_and_the_worst_categories_first():
    text = report.markdown_report(DOC, top=2)
    best = text.index("## Best 2")
    worst = text.index("## Worst 2")
    every = text.index("## All categories")
    best_rows = text[best:worst]
    worst_rows = text[worst:every]
    assert "| leather |" in best_rows and "| bottle |" in best_rows and "| cable |" not in best_rows
    assert "| cable |" in worst_rows and "| grid |" in worst_rows and "| leather |" not in worst_rows
    all_rows = [line.split("|")[1].strip() for line in text[every:].splitlines() if line.startswith("| ")][2:]
    assert all_rows == ["leather", "bottle", "carpet", "hazelnut", "capsule", "grid", "cable", "screw"]


def test_markdown_shows_percent_with_a_dash_for_undefined_metrics():
    text = report.markdown_report(DOC)
    screw = next(line for line in text.splitlines() if line.startswith("| screw |"))
    assert screw.count("–") == len(METRIC_KEYS)
    leather = next(line for line in text.splitlines() if line.startswith("| leather |"))
    assert "| 99.9 |" in leather
    assert text.count("| **mean** |") == 1


def test_report_writes_bars_curves_and_worst_cases_as_png(tmp_path):
    cats, scores, labels, maps, masks, images = _evaluation()
    doc = metrics.compute(cats, scores, labels, maps, masks)
    curves = metrics.compute_curves(cats, scores, labels, maps, masks)
    normal, anomalous = report.select_worst_cases(scores, labels, k=2)
    cases = [Case(images[i], maps[i], masks[i] if labels[i] else None, scores[i], labels[i], cats[i], f"#{i}")
             for i in np.r_[normal, anomalous]]
    written = report.write_report(doc, tmp_path, curves=curves, worst_cases=cases)
    assert set(written) == {"metrics.json", "metrics.md", "auroc_by_category.png", "roc_pr_curves.png",
                            "worst_cases.png"}
    for name in ("auroc_by_category.png", "roc_pr_curves.png", "worst_cases.png"):
        assert _is_png(written[name]), name


def test_bar_figure_is_drawn_without_pixel_metrics(tmp_path):
    doc = _doc({"a": 0.8, "b": 0.6}, with_pixels=False)
    assert _is_png(report.plot_auroc_by_category(doc, tmp_path / "bars.png"))


def test_worst_cases_accept_grey_images_and_maps_of_another_size(tmp_path):
    grey = np.zeros((40, 40), dtype=np.uint8)
    case = Case(grey, np.random.default_rng(0).random((10, 10)), np.ones((40, 40)), 0.3, 1, "grid")
    assert _is_png(report.plot_worst_cases([case], tmp_path / "worst.png"))


def test_select_worst_cases_picks_the_highest_normals_and_lowest_anomalies():
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.8, 0.05, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    normal, anomalous = report.select_worst_cases(scores, labels, k=2)
    assert normal.tolist() == [1, 6]
    assert anomalous.tolist() == [5, 3]


def test_mlflow_metric_names_are_flat_and_sanitised():
    doc = _doc({"pcb1": 0.9, "bag:v2/top view": 0.7, "..": 0.5})
    flat = report.mlflow_metrics(doc)
    assert flat["mean/image_auroc"] == pytest.approx(0.7)
    assert flat["image_auroc/pcb1"] == 0.9
    assert flat["image_auroc/bag_v2_top view"] == 0.7
    assert flat["image_auroc/_"] == 0.5
    assert flat["num_images"] == 30


def test_mlflow_metrics_leave_out_undefined_values():
    flat = report.mlflow_metrics(DOC)
    assert not any(name.endswith("/screw") for name in flat)
    assert "aupro/bottle" in flat


@pytest.fixture
def mlflow_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("report", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        yield run
    mlflow.set_tracking_uri(None)


def test_log_to_mlflow_records_metrics_and_every_report_file(mlflow_run, tmp_path):
    written = report.write_report(DOC, tmp_path / "report")
    report.log_to_mlflow(DOC, tmp_path / "report")
    client = MlflowClient()
    run = client.get_run(mlflow_run.info.run_id)
    assert run.data.metrics == pytest.approx(report.mlflow_metrics(DOC))
    logged = {item.path for item in client.list_artifacts(mlflow_run.info.run_id, "evaluation")}
    assert logged == {f"evaluation/{name}" for name in written}


def test_log_to_mlflow_without_an_active_run_raises():
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        report.log_to_mlflow(DOC)
