"""``anomdiff scale``: sweep files checked before Ray, the budget rule, and a 2 x 2 sweep that writes
its CSV, figures and MLflow runs and, after one cell's result is deleted, redoes that cell only."""

import csv
import json
from pathlib import Path

import mlflow
import pytest
from test_tune import TINY

from anomdiff.config import CONF_DIR
from anomdiff.data.splits import nested_subset
from anomdiff.data.synthetic import synthesize
from anomdiff.sweep import Cell, load_sweep
from pipelines import cli, runtime

SWEEP = CONF_DIR / "scale" / "synthetic.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "data"
    synthesize(out, 4, seed=1, image_size=32, train_per_category=10, test_per_category=4, workers=1)
    return out


@pytest.mark.parametrize(("overrides", "message"), [
    (["categories=[2,5]"], "K=5 is more than the 4 categories of"),
    (["methods=[knn,dffusion]"], "methods: unknown method 'dffusion'"),
    (["categories=[]"], "categories is empty"),
    (["budget=fixed"], "budget must be one of per_category, total"),
    (["categoires=[2]"], "did you mean categories?"),
])
def test_a_bad_sweep_is_one_line_before_ray_starts(dataset, capsys, monkeypatch, overrides, message):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a bad sweep"))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["scale", "--config", str(SWEEP), f"data.path={dataset}", *overrides])
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("anomdiff: error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_the_budget_rule_sets_each_cells_steps_and_the_categories_nest(dataset, tmp_path):
    base = [f"data.path={dataset}", f"output_dir={tmp_path}", "train.steps=10", "train.checkpoint_every=5",
            "train.vae_steps=4"]
    spec = load_sweep(SWEEP, [*base, "categories=[1,2,4]", "methods=[diad]"])
    assert spec.budget == "per_category"  # the default
    small, large = spec.config(Cell(1, "diad")), spec.config(Cell(4, "diad"))
    assert (small.train.steps, small.train.checkpoint_every, small.train.vae_steps) == (10, 5, 4)
    assert (large.train.steps, large.train.checkpoint_every, large.train.vae_steps) == (40, 20, 16)
    assert large.model.method == "diad" and large.data.num_categories == 4
    total = load_sweep(SWEEP, [*base, "categories=[1,4]", "methods=[diad]", "budget=total"])
    assert total.config(Cell(4, "diad")).train.steps == 10
    names = sorted(spec.dataset_categories)
    assert set(nested_subset(names, 2, small.data.category_seed)) <= set(nested_subset(names, 4))
    assert spec.anchors() == [c for c in nested_subset(names, 1)]  # min(10, smallest K) anchors
    capped = load_sweep(SWEEP, [f"data.path={dataset}"])  # the default K list, capped by the dataset
    assert capped.categories == [4]


def _cell(out: Path, name: str) -> Path:
    """A cell's folder: its name and the fingerprint of its settings."""
    [folder] = (out / "cells").glob(f"{name}-*")
    return folder


def _launches(out: Path) -> list[str]:
    path = out / "launches.log"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_a_two_by_two_sweep_writes_its_results_and_redoes_only_a_missing_cell(dataset, tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("ANOMDIFF_HOME", str(tmp_path / "home"))
    out = tmp_path / "sweep"
    args = ["scale", "--config", str(SWEEP), f"data.path={dataset}", f"output_dir={out}", "categories=[2,4]",
            "methods=[knn,diad]", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *TINY,
            "train.steps=2", "train.checkpoint_every=2", "train.vae_steps=1"]
    try:
        # Four logical CPUs: two cells (a Train worker of 0.5 CPU + a CPU for Parquet reads each) at
        # once, so the parallel path runs and their start-up waits overlap on the two cores.
        runtime.start_ray(None, num_cpus=4)
        cli.main(args)
        with open(out / "scaling.csv") as f:
            rows = list(csv.DictReader(f))
        assert sorted((int(r["K"]), r["method"]) for r in rows) == [(2, "diad"), (2, "knn"), (4, "diad"), (4, "knn")]
        for row in rows:
            assert 0 <= float(row["image_auroc_mean"]) <= 1 and 0 <= float(row["pixel_auroc_mean"]) <= 1
            assert int(row["anchor_categories"]) == 2 and int(row["model_values"]) > 0
            assert float(row["worker_peak_rss_mb"]) > 50 and float(row["train_s"]) > 0
        assert {int(r["steps"]) for r in rows if r["method"] == "diad"} == {2, 4}  # per-category budget
        diad = [r for r in rows if r["method"] == "diad"]
        assert all(float(r["train_images_per_s"]) > 0 and int(r["parameters"]) > 0 for r in diad)
        k4 = json.loads((_cell(out, "K4-knn") / "result.json").read_text())
        assert len(k4["per_category"]) == 4 and set(k4["categories"]) == set(k4["per_category"])
        k2 = json.loads((_cell(out, "K2-knn") / "result.json").read_text())
        assert set(k2["categories"]) < set(k4["categories"])  # nested, evaluated on its own 2 only
        assert set(k2["per_category"]) == set(k2["categories"])
        for name in ("auroc_vs_categories", "per_category_auroc", "cost_vs_categories", "auroc_drop"):
            assert (out / "figures" / f"{name}.png").stat().st_size > 0
        assert sorted(_launches(out)) == ["K2-diad", "K2-knn", "K4-diad", "K4-knn"]

        trained_s = json.loads((_cell(out, "K2-diad") / "result.json").read_text())["train_s"]
        (_cell(out, "K2-diad") / "result.json").unlink()
        kept = {c: (_cell(out, c) / "result.json").stat().st_mtime_ns for c in ("K2-knn", "K4-diad", "K4-knn")}
        cli.main(args)
        assert sorted(_launches(out)) == ["K2-diad", "K2-diad", "K2-knn", "K4-diad", "K4-knn"]
        assert kept == {c: (_cell(out, c) / "result.json").stat().st_mtime_ns for c in kept}
        redone = json.loads((_cell(out, "K2-diad") / "result.json").read_text())
        assert redone["train_s"] == trained_s  # its finished training reused, its time kept
        # The same folder with another budget is another sweep: refused, nothing mixed into the table.
        with pytest.raises(SystemExit) as refused:
            cli.main([*args, "budget=total"])
        assert refused.value.code == 2 and len(list((out / "cells").iterdir())) == 4
    finally:
        ray.shutdown()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = (out / "mlflow_run_id").read_text().strip()
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.data.tags["anomdiff.cell"] for c in children) == ["K2-diad", "K2-knn", "K4-diad", "K4-knn"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent, "scaling")}
    assert "scaling/scaling.csv" in artifacts and "scaling/auroc_vs_categories.png" in artifacts


def test_a_cells_folder_changes_with_any_setting_that_decides_its_result(dataset):
    spec = load_sweep(SWEEP, [f"data.path={dataset}", "categories=[2,4]", "methods=[knn,diad]"])
    cell = spec.cells()[-1]  # K=4: its steps depend on the budget rule (K=2, the smallest, trains the base steps)
    same = load_sweep(SWEEP, [f"data.path={dataset}", "categories=[2,4]", "methods=[knn,diad]"])
    assert spec.folder_of(cell) == same.folder_of(cell) and spec.folder_of(cell).startswith(f"{cell.name}-")
    for change in ("budget=total", "train.steps=7", "seed=3", "categories=[1,4]"):
        other = load_sweep(SWEEP, [f"data.path={dataset}", "categories=[2,4]", "methods=[knn,diad]", change])
        assert other.folder_of(cell) != spec.folder_of(cell), change


def test_concurrency_is_sized_by_what_the_cluster_can_grow_to(dataset, monkeypatch):
    """An autoscaling RayCluster starts with no GPU node: cells are sized by the autoscaler's ceiling."""
    import ray

    from pipelines import autoscaling, scale

    cfg = load_sweep(SWEEP, [f"data.path={dataset}", "train.use_gpu=true", "train.num_workers=8",
                             "train.cpus_per_worker=4"]).base()
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})  # the head alone
    monkeypatch.setattr(autoscaling, "autoscaler_ceiling", lambda: {"CPU": 200.0, "GPU": 32.0})
    assert scale.concurrency(cfg) == 4  # 32 GPUs at most, 8 per cell (CPU: 33 each, 200 in all)
    monkeypatch.setattr(autoscaling, "autoscaler_ceiling", lambda: None)  # no autoscaler: what there is
    assert scale.concurrency(cfg) == 1
