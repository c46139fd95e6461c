"""``anomdiff scale``: sweep files checked before Ray, the budget rule, seeds, the summary (seed band,
anchor drop, knn's cost), and a 2 x 2 sweep that writes its CSV, figures and MLflow runs and, after
one cell's result is deleted, redoes that cell only."""

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from test_tune import TINY

from anomdiff.config import CONF_DIR
from anomdiff.data.splits import nested_subset
from anomdiff.data.synthetic import synthesize
from anomdiff.sweep import Cell, load_sweep
from pipelines import cli, runtime, scale

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
    (["seeds=[]"], "seeds must be a non-empty list"),
    (["seeds=[0,-1]"], "every seed must be a non-negative integer"),
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
    small, large = spec.config(Cell(1, "diad", 0)), spec.config(Cell(4, "diad", 0))
    assert (small.train.steps, small.train.checkpoint_every, small.train.vae_steps) == (10, 5, 4)
    assert (large.train.steps, large.train.checkpoint_every, large.train.vae_steps) == (40, 20, 16)
    assert large.model.method == "diad" and large.data.num_categories == 4
    total = load_sweep(SWEEP, [*base, "categories=[1,4]", "methods=[diad]", "budget=total"])
    assert total.config(Cell(4, "diad", 0)).train.steps == 10
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
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the user's store
    out = tmp_path / "sweep"
    args = ["scale", "--config", str(SWEEP), f"data.path={dataset}", f"output_dir={out}", "categories=[2,4]",
            "methods=[knn,diad]", *TINY,
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
            assert int(row["seeds"]) == 1 and row["image_auroc_seed_min"] == ""  # one seed: no band
            assert int(row["images_seen"]) > 0
        assert {int(r["steps"]) for r in rows if r["method"] == "diad"} == {2, 4}  # per-category budget
        knn = [r for r in rows if r["method"] == "knn"]
        assert all(r["steps"] == "" and int(r["bank_patches"]) > 0 for r in knn)  # no steps; its bank instead
        diad = [r for r in rows if r["method"] == "diad"]
        assert all(float(r["train_images_per_s"]) > 0 and int(r["parameters"]) > 0 for r in diad)
        k4 = json.loads((_cell(out, "K4-knn") / "result.json").read_text())
        assert len(k4["per_category"]) == 4 and set(k4["categories"]) == set(k4["per_category"])
        k2 = json.loads((_cell(out, "K2-knn") / "result.json").read_text())
        assert set(k2["categories"]) < set(k4["categories"])  # nested, evaluated on its own 2 only
        assert set(k2["per_category"]) == set(k2["categories"])
        for name in ("auroc_vs_categories", "per_category_auroc", "cost_vs_categories", "auroc_drop"):
            assert (out / "figures" / f"{name}.png").stat().st_size > 0
        assert sorted(_launches(out)) == ["K2-diad-seed0", "K2-knn-seed0", "K4-diad-seed0", "K4-knn-seed0"]
        summary = json.loads((out / "scaling.json").read_text())
        assert set(summary["anchor_auroc_drop"]) == {"knn", "diad"} and len(summary["anchor_categories"]) == 2

        trained_s = json.loads((_cell(out, "K2-diad") / "result.json").read_text())["train_s"]
        (_cell(out, "K2-diad") / "result.json").unlink()
        kept = {c: (_cell(out, c) / "result.json").stat().st_mtime_ns for c in ("K2-knn", "K4-diad", "K4-knn")}
        cli.main(args)
        assert sorted(_launches(out)) == ["K2-diad-seed0", "K2-diad-seed0", "K2-knn-seed0", "K4-diad-seed0",
                                          "K4-knn-seed0"]
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
    summaries = [c.data.tags["anomdiff.cell"] for c in children if "anomdiff.cell" in c.data.tags]
    assert sorted(summaries) == ["K2-diad-seed0", "K2-knn-seed0", "K4-diad-seed0", "K4-knn-seed0"]
    # Each cell's own training and evaluation runs, opened in its Ray task, are children of the sweep's
    # run in the same store: a training per cell, an evaluation per cell and the redone cell's again.
    trained = {(_cell(out, c) / "run" / "mlflow_run_id").read_text().strip()
               for c in ("K2-diad", "K2-knn", "K4-diad", "K4-knn")}
    assert {c.info.run_id for c in children if c.data.tags.get("mlflow.runName", "").startswith("scale ")
            and "anomdiff.cell" not in c.data.tags} == trained
    assert len([c for c in children if c.data.tags.get("anomdiff.job") == "evaluate"]) == 5
    assert len(children) == 4 + 4 + 5
    assert not (tmp_path / "home" / "mlflow.db").exists()  # three sweeps in one process, all in the user's store
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent, "scaling")}
    assert "scaling/scaling.csv" in artifacts and "scaling/auroc_vs_categories.png" in artifacts


def test_a_cells_folder_changes_with_any_setting_that_decides_its_result(dataset):
    spec = load_sweep(SWEEP, [f"data.path={dataset}", "categories=[2,4]", "methods=[knn,diad]"])
    cell = spec.cells()[-1]  # K=4: its steps depend on the budget rule (K=2, the smallest, trains the base steps)
    same = load_sweep(SWEEP, [f"data.path={dataset}", "categories=[2,4]", "methods=[knn,diad]"])
    assert spec.folder_of(cell) == same.folder_of(cell) and spec.folder_of(cell).startswith(f"{cell.name}-")
    for change in ("budget=total", "train.steps=7", "seed=3", "seeds=[3]", "categories=[1,4]"):
        other = load_sweep(SWEEP, [f"data.path={dataset}", "categories=[2,4]", "methods=[knn,diad]", change])
        moved = other.cells()[-1]  # K=4 diad again, of the seed that sweep has
        assert other.fingerprint(moved) != spec.fingerprint(cell), change


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


def _write_result(spec, cell: Cell, folder: str | None = None) -> None:
    path = Path(spec.output_dir) / "cells" / (folder or spec.folder_of(cell)) / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"K": cell.k, "method": cell.method, "per_category": {}}))


def test_seeds_repeat_each_cell_and_more_seeds_run_only_the_new_cells(dataset, tmp_path):
    base = [f"data.path={dataset}", f"output_dir={tmp_path}", "categories=[2,4]", "methods=[knn,diad]"]
    one = load_sweep(SWEEP, base)
    assert one.seeds == [one.base().seed] and len(one.cells()) == 4  # default: the base's seed alone
    assert load_sweep(SWEEP, [*base, "seed=5"]).seeds == [5]
    three = load_sweep(SWEEP, [*base, "seeds=[0,1,2]"])
    assert len(three.cells()) == 12
    cells = [c for c in three.cells() if (c.k, c.method) == (4, "diad")]
    assert [three.config(c).seed for c in cells] == [0, 1, 2]
    folders = [three.folder_of(c) for c in cells]
    assert len(set(folders)) == 3 and [f.startswith(f"K4-diad-seed{s}-") for s, f in enumerate(folders)] == [True] * 3
    assert three.folder_of(cells[0]) == one.folder_of(Cell(4, "diad", 0))  # seed 0's cell is the one-seed cell

    # A finished one-seed sweep, then seeds=[0,1,2] in the same folder: the same sweep, only seeds 1 and 2 to run.
    scale._same_sweep(one, tmp_path)
    for cell in one.cells():
        _write_result(one, cell)
    scale._same_sweep(three, tmp_path)
    todo = [c for c in three.cells() if scale.read_result(three, c) is None]
    assert sorted({c.seed for c in todo}) == [1, 2] and len(todo) == 8
    with pytest.raises(FileExistsError):  # another base is still refused
        scale._same_sweep(load_sweep(SWEEP, [*base, "seeds=[0,1,2]", "train.steps=7"]), tmp_path)

    # A cell finished before sweeps had seeds (no seed in its folder's name) is still found.
    old = load_sweep(SWEEP, [*base[:1], f"output_dir={tmp_path / 'old'}", *base[2:]])
    cell = old.cells()[0]
    _write_result(old, cell, old.old_folder_of(cell))
    assert old.old_folder_of(cell).startswith(f"K{cell.k}-{cell.method}-") and "seed" not in old.old_folder_of(cell)
    assert scale.read_result(old, cell)["seed"] == cell.seed


def _result(method: str, k: int, seed: int, image: dict[str, float], **cost) -> dict:
    return {"K": k, "method": method, "seed": seed, "steps": 10 * k, "train_s": 5.0 * k, **cost,
            "per_category": {c: {"image_auroc": v, "pixel_auroc": v, "aupro": None, "image_ap": v}
                             for c, v in image.items()}}


def test_the_summary_gives_the_seeds_band_the_anchor_drop_and_knns_cost(dataset, tmp_path):
    spec = load_sweep(SWEEP, [f"data.path={dataset}", f"output_dir={tmp_path}", "categories=[2,4]",
                              "methods=[knn,diad]", "seeds=[0,1]"])
    a, b = spec.anchors()
    c, d = [n for n in spec.dataset_categories if n not in (a, b)]
    results = [  # the anchors fall by 0.10 (seed 0) and 0.20 (seed 1); the new categories at K=4 are worse
        _result("diad", 2, 0, {a: 0.9, b: 0.8}, images_seen=320),
        _result("diad", 4, 0, {a: 0.8, b: 0.7, c: 0.5, d: 0.5}, images_seen=640),
        _result("diad", 2, 1, {a: 0.95, b: 0.85}, images_seen=320),
        _result("diad", 4, 1, {a: 0.7, b: 0.7, c: 0.5, d: 0.5}, images_seen=640),
        _result("knn", 2, 0, {a: 0.7, b: 0.7}, images_seen=16, bank_patches=900),
        _result("knn", 4, 0, {a: 0.7, b: 0.7, c: 0.6, d: 0.6}, images_seen=32, bank_patches=1800),
        _result("knn", 2, 1, {a: 0.7, b: 0.7}, images_seen=16, bank_patches=900),
        _result("knn", 4, 1, {a: 0.7, b: 0.7, c: 0.6, d: 0.6}, images_seen=32, bank_patches=1800),
    ]
    rows = {(r["method"], r["K"]): r for r in scale._rows(spec, results)}
    diad = rows[("diad", 4)]
    assert diad["seeds"] == 2 and diad["image_auroc_mean"] == pytest.approx((0.625 + 0.6) / 2)
    assert (diad["image_auroc_seed_min"], diad["image_auroc_seed_max"]) == pytest.approx((0.6, 0.625))
    assert diad["anchor_image_auroc"] == pytest.approx(0.725)
    assert (diad["anchor_image_auroc_seed_min"], diad["anchor_image_auroc_seed_max"]) == pytest.approx((0.7, 0.75))
    assert diad["aupro_seed_min"] is None and math.isnan(diad["aupro_mean"])  # no value: no band either

    # The drop compares the anchor categories only (over each K's whole set it would be 0.225 and 0.30).
    drop = scale._drops(spec, results)["diad"]
    assert (drop["K_from"], drop["K_to"], drop["seeds"]) == (2, 4, 2)
    assert drop["image_auroc"] == pytest.approx(0.15)
    assert (drop["image_auroc_seed_min"], drop["image_auroc_seed_max"]) == pytest.approx((0.10, 0.20))

    # knn: no steps (it trains none), its images read and its bank; the trained method keeps its steps.
    knn = rows[("knn", 4)]
    assert knn["steps"] is None and (knn["images_seen"], knn["bank_patches"], knn["train_s"]) == (32, 1800, 20.0)
    assert diad["steps"] == 40 and diad["images_seen"] == 640 and diad["bank_patches"] is None

    # One seed: the mean is that seed's value and there is no band, in the rows or the drop.
    single = load_sweep(SWEEP, [f"data.path={dataset}", f"output_dir={tmp_path}", "categories=[2,4]",
                                "methods=[knn,diad]", "seeds=[0]"])
    seed0 = [r for r in results if r["seed"] == 0]
    lone = {(r["method"], r["K"]): r for r in scale._rows(single, seed0)}[("diad", 4)]
    assert lone["seeds"] == 1 and lone["image_auroc_mean"] == pytest.approx(0.625)
    assert lone["image_auroc_seed_min"] is None and lone["image_auroc_seed_max"] is None
    lone_drop = scale._drops(single, seed0)["diad"]
    assert lone_drop["image_auroc"] == pytest.approx(0.10) and lone_drop["image_auroc_seed_min"] is None

    # The rows fit the CSV's columns, and the figures draw with and without a band.
    for sweep, kept in ((spec, results), (single, seed0)):
        scale.write_csv_atomic(tmp_path / "scaling.csv", scale._rows(sweep, kept), scale.COLUMNS)
        paths = scale._figures(sweep, scale._rows(sweep, kept), scale._drops(sweep, kept), kept, tmp_path / "figures")
        assert len(paths) == 4 and all(p.stat().st_size > 0 for p in paths)


def test_a_cells_cost_counts_the_images_its_training_read(dataset):
    from anomdiff.data.manifest import read_manifest
    from pipelines.data import DataSpec, validation_ids

    spec = load_sweep(SWEEP, [f"data.path={dataset}", "categories=[2,4]", "methods=[knn,diad]", "train.steps=10",
                              "train.vae_steps=4", "train.batch_size=3", "train.grad_accum=2", "train.num_workers=2",
                              "data.validation_fraction=0.3"])
    cfg = spec.config(Cell(4, "diad", 0))  # per_category: twice the base steps
    both = scale._cost(cfg, SimpleNamespace(stages=("vae", "denoiser")))
    assert both == {"images_seen": (20 + 8) * 3 * 2 * 2, "bank_patches": None}
    assert scale._cost(cfg, SimpleNamespace(stages=("denoiser",)))["images_seen"] == 20 * 3 * 2 * 2

    knn = spec.config(Cell(4, "knn", 0))
    bank = SimpleNamespace(trained_by_gradient=False, memory=[[0.0]] * 37)
    held = sum(len(ids) for ids in validation_ids(DataSpec.open(knn.data, 32)).values())
    train = sum(n["train"]["normal"] for n in read_manifest(dataset)["counts"].values())
    assert 0 < held < train
    assert scale._cost(knn, bank) == {"images_seen": train - held, "bank_patches": 37}  # each image once
