"""End to end on a local Ray: train (2 workers, DeepSpeed ZeRO-3), export, resume, evaluate."""

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from anomdiff.config import CONF_DIR, load_config
from anomdiff.data.schema import read_shard
from anomdiff.data.splits import is_validation
from anomdiff.data.synthetic import synthesize

ray = pytest.importorskip("ray")
DEMO = CONF_DIR / "experiment" / "demo.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "data"
    synthesize(out, 3, seed=1, image_size=32, train_per_category=10, test_per_category=4, workers=1)
    return out


def tiny_config(data, out, *extra):
    return load_config(DEMO, [
        f"data.path={data}", f"output_dir={out}", "model.image_size=32", "model.vae.sample_size=32",
        "model.unet.sample_size=8", "model.diffusion.ddim_steps=2", "train.batch_size=4", "train.steps=4",
        "train.checkpoint_every=2", "train.log_every=2", "train.vae_steps=2", "train.validation_images=4",
        "data.validation_fraction=0.2",
        "evaluate.batch_size=8", f"tracking.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}", *extra])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_zero3_on_two_workers_exports_a_model_that_resumes_and_evaluates(local_ray, dataset, tmp_path):
    from anomdiff.models import load_model
    from pipelines import evaluate, train

    cfg = tiny_config(dataset, tmp_path / "run", "train.num_workers=2", "train.zero.stage=3")
    metadata = train.run(cfg)
    assert metadata["step"] in (2, 4) and 0.0 <= metadata["val_image_auroc"] <= 1.0
    model = load_model(tmp_path / "run" / "model")
    assert model.metadata["categories"] == sorted(["noise-000", "stripes-001", "grid-002"])
    assert model.metadata["threshold"] == metadata["threshold"]

    again = train.run(cfg)  # same output_dir and config: resumes from the finished run, trains nothing more
    assert again == metadata

    # The finished run's last checkpoint truncated: the same command falls back to the step-2 one
    # (loading the truncated file would fail), trains steps 3-4 again and exports a whole checkpoint.
    def checkpoint_steps() -> dict:
        return {p.parent: (json.loads(p.read_text())["step"], p.stat().st_mtime)
                for p in (tmp_path / "run" / "ray").glob("checkpoint_*/train_state.json")}

    damaged = max(checkpoint_steps().items(), key=lambda item: item[1])[0]
    shard = damaged / "ds" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    damaged_at = time.time()
    metadata = train.run(cfg)
    assert [step for step, mtime in checkpoint_steps().values() if mtime > damaged_at] == [4]

    doc = evaluate.evaluate(str(tmp_path / "run" / "model"), str(dataset), str(tmp_path / "report"))
    assert doc["num_images"] == 12 and set(doc["per_category"]) == set(model.metadata["categories"])
    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == doc
    assert (tmp_path / "report" / "worst_cases.png").is_file()
    exact = evaluate.evaluate(str(tmp_path / "run" / "model"), str(dataset), str(tmp_path / "exact"),
                              ["evaluate.streaming=false", "evaluate.save_maps=true"])  # every map to the driver
    assert exact["mean"]["image_auroc"] == doc["mean"]["image_auroc"]
    assert abs(exact["mean"]["pixel_auroc"] - doc["mean"]["pixel_auroc"]) < 0.01

    # A row per test image, the decision at the exported threshold, the same on both paths; F1 of those
    # decisions in the metrics document; the maps on request.
    with open(tmp_path / "report" / "images.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["category"] for r in rows} == set(model.metadata["categories"])
    assert all(r["decision"] == str(float(r["score"]) >= metadata["threshold"]).lower() for r in rows)
    with open(tmp_path / "exact" / "images.csv") as f:
        exact_rows = list(csv.DictReader(f))
    assert [(r["sample_id"], r["decision"]) for r in exact_rows] == [(r["sample_id"], r["decision"]) for r in rows]
    decided = {(r["category"], int(r["label"]), r["decision"] == "true") for r in rows}
    f1 = doc["at_threshold"]["per_category"]
    assert doc["at_threshold"]["threshold"] == metadata["threshold"] and set(f1) == set(model.metadata["categories"])
    assert all((f1[c]["image_recall"] == 0) == ((c, 1, True) not in decided) for c in f1)
    saved = np.load(tmp_path / "exact" / exact_rows[0]["map"])
    assert saved.shape == (32, 32) and "map" not in rows[0]


def test_a_streaming_scorer_sends_partial_metrics_and_new_worst_cases_but_no_maps(tmp_path):
    """The scoring actor's side of evaluation: per batch one row of partial metrics and the worst
    cases it newly keeps; merged, the partials equal the metrics of every map seen at once."""
    import pickle

    import numpy as np
    from samples import noise_bank_knn

    from anomdiff.metrics import StreamingMetrics
    from pipelines.evaluate import Scorer

    knn = noise_bank_knn(image_size=32, num_categories=2)
    knn.save(tmp_path / "knn", metadata={"categories": ["a", "b"]})
    fold = {"score_range": (0.0, 20.0), "num_bins": 256, "worst_cases": 2, "categories": ["a", "b"]}
    streaming, plain = Scorer(str(tmp_path / "knn"), {}, False, fold), Scorer(str(tmp_path / "knn"), {}, False)
    rng = np.random.default_rng(0)
    merged, whole, kept = StreamingMetrics(score_range=(0.0, 20.0), num_bins=256), None, []
    for b in range(3):
        masks = (rng.random((4, 1, 32, 32)) > 0.9).astype(np.uint8) * np.array([0, 1, 0, 1])[:, None, None, None]
        batch = {"image": rng.uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32), "sample_id": np.arange(4) + 4 * b,
                 "category_index": np.array([0, 1, 0, 1]), "label": np.array([0, 1, 0, 1]), "mask": masks}
        row = streaming(batch)
        assert set(row) == {"images", "partial", "cases", "rows"} and len(row["partial"]) == 1  # no anomaly_map
        assert [r["sample_id"] for r in json.loads(row["rows"][0])] == [str(s) for s in batch["sample_id"]]
        merged.merge(pickle.loads(row["partial"][0]))
        kept += pickle.loads(row["cases"][0])
        out = plain(batch)
        part = StreamingMetrics(score_range=(0.0, 20.0), num_bins=256)
        part.update(np.array(["a", "b"])[out["category_index"]], out["image_score"], out["label"], out["anomaly_map"],
                    out["mask"])
        whole = part if whole is None else whole.merge(part)
    assert merged.compute() == whole.compute()
    assert 4 <= len(kept) <= 12 and all(case.anomaly_map.shape == (32, 32) for case in kept)


def test_bad_runs_fail_before_training(dataset, tmp_path):
    from pipelines import train

    cfg = tiny_config(dataset, tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("someone else's files")
    with pytest.raises(FileExistsError, match="not an anomdiff run"):
        train.preflight(cfg)
    with pytest.raises(ValueError, match="no manifest"):
        train.preflight(tiny_config(tmp_path / "missing", tmp_path / "other"))
    with pytest.raises(ValueError, match="asked for 9 categories"):
        train.preflight(tiny_config(dataset, tmp_path / "other", "data.num_categories=9"))


def test_a_start_refused_for_its_validation_split_leaves_the_folder_free(dataset, tmp_path):
    """No validation normal in a category: refused before the run's config is pinned on the folder,
    so the same command with a larger hold-out starts there."""
    from pipelines import train

    cfg = tiny_config(dataset, tmp_path / "run", "data.validation_fraction=0.01")
    with pytest.raises(ValueError, match="has no validation normal"):
        train._train(cfg, train.preflight(cfg), tmp_path / "run", None)
    assert not (tmp_path / "run" / "config.yaml").exists()
    train.preflight(tiny_config(dataset, tmp_path / "run", "data.validation_fraction=0.3"))


def test_more_workers_than_the_cluster_can_place_is_refused(dataset, tmp_path, monkeypatch):
    from pipelines import train

    monkeypatch.setattr(train.ray, "cluster_resources", lambda: {"CPU": 2.0})
    cfg = tiny_config(dataset, tmp_path / "run", "train.num_workers=8")
    spec = train.preflight(cfg)
    with pytest.raises(ValueError, match="train.num_workers=8 needs 4 CPU but the cluster has 2"):
        train.check_resources(cfg, spec)
    monkeypatch.setattr(train.runtime, "start_ray", lambda address=None: None)
    with pytest.raises(ValueError, match="needs 4 CPU"):
        train.run(cfg)
    # The refused start leaves no config behind, so the corrected command is not "another run".
    assert not (tmp_path / "run" / train.RESOLVED_CONFIG).exists()
    train.preflight(tiny_config(dataset, tmp_path / "run", "train.num_workers=1"))


def test_an_autoscaling_cluster_is_asked_for_the_workers_and_waited_for_within_the_bound(dataset, tmp_path,
                                                                                          monkeypatch):

    from pipelines import train

    asked, calls = [], []

    def growing() -> dict:  # a node arrives after the first two looks
        calls.append(1)
        return {"CPU": 2.0 if len(calls) < 3 else 8.0, "object_store_memory": 1e12}

    monkeypatch.setattr(train.ray, "cluster_resources", growing)
    monkeypatch.setattr(train.time, "sleep", lambda seconds: None)
    cfg = tiny_config(dataset, tmp_path / "run", "train.num_workers=8", "train.resource_wait_s=30")
    train.check_resources(cfg, train.preflight(cfg), ask=asked.append)
    assert asked == [[{"CPU": 0.5}] * 8] and len(calls) >= 3
    monkeypatch.setattr(train.ray, "cluster_resources", lambda: {"CPU": 2.0})
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(train.time, "monotonic", lambda: next(clock))
    with pytest.raises(ValueError, match="needs 4 CPU but the cluster has 2 after 30 s of waiting for the autoscaler"):
        train.check_resources(cfg, train.preflight(cfg))


def test_more_than_the_autoscalers_node_groups_can_ever_hold_is_refused_without_waiting(dataset, tmp_path,
                                                                                        monkeypatch):

    from pipelines import train

    monkeypatch.setattr(train.ray, "cluster_resources", lambda: {"CPU": 2.0, "object_store_memory": 1e12})
    monkeypatch.setattr(train.time, "sleep", lambda seconds: pytest.fail("waited for the impossible"))
    monkeypatch.setattr(train, "autoscaler_ceiling", lambda: {"CPU": 3.0, "GPU": 0})
    cfg = tiny_config(dataset, tmp_path / "run", "train.num_workers=8", "train.resource_wait_s=900")
    with pytest.raises(ValueError, match="needs 4 CPU but the autoscaler's node groups hold at most 3"):
        train.check_resources(cfg, train.preflight(cfg), ask=lambda bundles: pytest.fail("asked the autoscaler"))
    # Within the ceiling the same request is waited for, as before.
    monkeypatch.setattr(train, "autoscaler_ceiling", lambda: {"CPU": 64.0})
    monkeypatch.setattr(train.time, "sleep", lambda seconds: None)
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(train.time, "monotonic", lambda: next(clock))
    with pytest.raises(ValueError, match="after 900 s of waiting for the autoscaler"):
        train.check_resources(cfg, train.preflight(cfg))


def autoscaler_request() -> list[dict]:
    """What the autoscaler is asked for now (Ray's v1 request channel in the GCS key-value store)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


@pytest.mark.slow
def test_autoscaler_requests_are_the_union_of_live_jobs_and_end_with_them(local_ray):
    from pipelines import autoscaling

    cpu, gpu = {"CPU": 0.5}, {"CPU": 4, "GPU": 1}
    with autoscaling.holding([cpu] * 2):
        with autoscaling.holding([gpu] * 3):  # a second job does not erase the first one's need
            assert sorted(map(json.dumps, autoscaler_request())) == sorted(map(json.dumps, [cpu] * 2 + [gpu] * 3))
        assert autoscaler_request() == [cpu] * 2
        with pytest.raises(RuntimeError), autoscaling.holding([gpu]):  # a failed job withdraws its need too
            raise RuntimeError("the job failed")
        assert autoscaler_request() == [cpu] * 2
    assert autoscaler_request() == []
    # A need its driver stops renewing (a killed driver) lapses by itself.
    keeper = autoscaling.Requests.options(namespace="anomdiff-test").remote(prune_every_s=0.2)
    ray.get(keeper.hold.remote("killed", [gpu], 0.5))
    assert ray.get(keeper.bundles.remote()) == [gpu]
    time.sleep(1.5)
    assert ray.get(keeper.bundles.remote()) == [] and autoscaler_request() == []


def test_a_training_cache_the_object_store_cannot_hold_is_refused(dataset, tmp_path, monkeypatch):
    from pipelines import train

    monkeypatch.setattr(train.ray, "cluster_resources", lambda: {"CPU": 2.0, "object_store_memory": 1e5})
    cfg = tiny_config(dataset, tmp_path / "run", "data.cache=true")
    with pytest.raises(ValueError, match="data.cache=true keeps up to .* set data.cache=false"):
        train.check_resources(cfg, train.preflight(cfg))
    streaming = tiny_config(dataset, tmp_path / "run", "data.cache=false")
    train.check_resources(streaming, train.preflight(streaming))  # streaming needs no room


@pytest.mark.slow
def test_knn_builds_its_bank_on_two_workers_and_evaluates_without_the_category(local_ray, dataset, tmp_path,
                                                                              monkeypatch):
    """Also the whole lifecycle in one process under a store the user exported (train twice, evaluate,
    promote, predict): every run and registry change lands there, none in ANOMDIFF_HOME's default."""
    from anomdiff.models import load_model
    from pipelines import cli, evaluate, train

    users = f"sqlite:///{tmp_path / 'users' / 'mlflow.db'}"
    (tmp_path / "users").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", users)
    monkeypatch.setenv("ANOMDIFF_HOME", str(tmp_path / "home"))
    cfg = tiny_config(dataset, tmp_path / "run", "model.method=knn", "train.num_workers=2",
                      "tracking.registered_model=demo-knn", "tracking.tracking_uri=null")
    metadata = train.run(cfg)
    model = load_model(tmp_path / "run" / "model")
    assert model.method == "knn" and metadata["step"] == 0 and 0.0 <= metadata["val_image_auroc"] <= 1.0
    # Both ranks' shards reach the bank, reduced once: each category keeps coreset_ratio of all its
    # training patches (8 x 8 per 32 px image), whichever rank saw them.
    shards = [read_shard(path, columns=["sample_id", "category"])
              for path in sorted(dataset.rglob("split=train/*.parquet"))]
    kept = [row["category"] for shard in shards for row in shard.to_pylist()
            if not is_validation(row["sample_id"], cfg.data.validation_fraction, cfg.data.validation_seed)]
    categories = model.metadata["categories"]
    expected = [model.coreset_size(64 * kept.count(c)) for c in categories]
    assert torch.bincount(model.memory_category, minlength=3).tolist() == expected
    def checkpointed_banks():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "ray").glob("checkpoint_*/model/*.safetensors")}

    banks = checkpointed_banks()
    assert len(banks) == 1
    assert train.run(cfg) == metadata  # a finished run is kept as it is: exported again, not rebuilt
    assert checkpointed_banks() == banks
    # The model went to MLflow once (not again when the finished run was started a second time),
    # registered with its validation metrics.
    client = MlflowClient()
    [version] = client.search_model_versions("name = 'demo-knn'")
    assert float(version.tags["val_image_auroc"]) == pytest.approx(metadata["val_image_auroc"], abs=1e-6)
    assert version.run_id == (tmp_path / "run" / "mlflow_run_id").read_text().strip()

    doc = evaluate.evaluate("models:/demo-knn/1", str(dataset), str(tmp_path / "report"))
    assert doc["protocol"] == "label_free" and doc["num_images"] == 12
    assert "unified protocol" in (tmp_path / "report" / "metrics.md").read_text()
    tags = client.get_model_version("demo-knn", "1").tags  # the test metrics are recorded on the version
    assert float(tags["test_image_auroc"]) == pytest.approx(doc["mean"]["image_auroc"], abs=1e-6)
    evaluation_run = client.get_run(tags["evaluation_run"])
    assert evaluation_run.data.tags["anomdiff.training_run"] == version.run_id
    assert evaluation_run.data.tags["anomdiff.model_versions"] == "demo-knn/1"

    cli.main(["promote", "demo-knn"])
    assert client.get_model_version_by_alias("demo-knn", "champion").version in (1, "1")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(images / f"{i}.png")
    cli.main(["predict", "models:/demo-knn@champion", str(images), "--out", str(tmp_path / "pred"), "--no-overlays"])
    assert (tmp_path / "pred" / "predictions.csv").read_text().count(".png") == 2

    assert MlflowClient().tracking_uri == users
    store = MlflowClient(tracking_uri=users)
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
    assert sorted(r.data.tags.get("anomdiff.job", "train") for r in runs) == ["evaluate", "train"]
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_pretrained_weights_out_of_reach_stop_the_run_before_ray_with_the_keys_to_set(dataset, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pipelines import train

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a machine without the Hub
    cfg = tiny_config(dataset, tmp_path / "run", "model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5",
                      "model.backbone.pretrained=hub")
    with pytest.raises(ValueError, match=r"model.pretrained: cannot get .* pass model.pretrained=DIR") as error:
        train.preflight(cfg)
    assert "model.backbone.pretrained" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="has no unet/config.json or vae/config.json"):
        train.preflight(tiny_config(dataset, tmp_path / "run", f"model.pretrained={tmp_path}"))


@pytest.mark.slow
def test_proad_trains_its_one_stage_with_only_the_method_changed_and_evaluates(local_ray, dataset, tmp_path):
    """The demo experiment with ``model.method=proad`` and nothing else of Pro-AD's: one stage (no
    autoencoder steps although the experiment asks for some), exported, evaluated label-free."""
    from anomdiff.models import load_model
    from pipelines import evaluate, train

    cfg = tiny_config(dataset, tmp_path / "run", "model.method=proad", "train.num_workers=2")
    metadata = train.run(cfg)
    model = load_model(tmp_path / "run" / "model")
    assert model.method == "proad" and model.stages == ("denoiser",)
    assert metadata["step"] in (2, 4) and 0.0 <= metadata["val_image_auroc"] <= 1.0  # chosen on validation
    assert metadata["val_images"] == 4  # train.validation_images, split between the 2 workers, not 2 x 4
    import mlflow

    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    parent = client.get_run((tmp_path / "run" / "mlflow_run_id").read_text().strip())
    stages = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.info.run_name for run in stages) == ["denoiser"]
    doc = evaluate.evaluate(str(tmp_path / "run" / "model"), str(dataset), str(tmp_path / "report"))
    assert doc["protocol"] == "label_free" and doc["num_images"] == 12


@pytest.mark.slow
def test_drdc_trains_base_and_inpainter_with_only_the_method_changed_and_evaluates(local_ray, dataset, tmp_path):
    """The demo experiment with ``model.method=drdc``: the tiny preset's pixel-space inpainter and its
    Pro-AD base train together in one stage, and the exported model is evaluated label-free."""
    from anomdiff.models import load_model
    from pipelines import evaluate, train

    cfg = tiny_config(dataset, tmp_path / "run", "model.method=drdc", "train.num_workers=2")
    metadata = train.run(cfg)
    model = load_model(tmp_path / "run" / "model")
    assert model.method == "drdc" and model.stages == ("denoiser",) and model.base.method == "proad"
    assert metadata["step"] in (2, 4) and 0.0 <= metadata["val_image_auroc"] <= 1.0
    doc = evaluate.evaluate(str(tmp_path / "run" / "model"), str(dataset), str(tmp_path / "report"),
                            ["model.drdc.gamma=0.3"])
    assert doc["protocol"] == "label_free" and doc["num_images"] == 12


def test_an_mlflow_server_that_does_not_answer_stops_the_run_before_ray(dataset, tmp_path, monkeypatch):
    import socket

    from pipelines import train

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(ValueError, match=f"the MLflow server at http://127.0.0.1:{port} does not answer"):
        train.preflight(tiny_config(dataset, tmp_path / "run"))


def test_the_uri_mlflow_writes_into_the_environment_does_not_override_the_next_jobs_config(tmp_path, monkeypatch):
    """``mlflow.set_tracking_uri`` also sets MLFLOW_TRACKING_URI; a second job in the same process must
    still log where its own config says, and a URI the user set still wins."""
    import os

    from anomdiff.config import TrackingConfig
    from pipelines import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'second.db'}"
    tracking.use_experiment(TrackingConfig(tracking_uri=first))
    assert os.environ["MLFLOW_TRACKING_URI"] == first
    assert tracking.tracking_uri(second) == second
    users = f"sqlite:///{tmp_path / 'users.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", users)
    assert tracking.tracking_uri(second) == users
    # The user's store stays the user's after a job has pointed MLflow at it, however often it resolves
    tracking.use_experiment(TrackingConfig(tracking_uri=second))
    assert tracking.tracking_uri(second) == users and tracking.point_at_store(TrackingConfig()) == users


def test_a_users_store_given_when_the_process_started_takes_every_run(tmp_path):
    """Exported before the jobs start (the way a user sets it), the variable names the store of every
    run of every job the process runs, the second job's as much as the first's."""
    users = tmp_path / "users.db"
    script = (
        "from anomdiff.config import TrackingConfig\n"
        "from pipelines import tracking\n"
        "for name in ('first', 'second', 'third'):\n"
        "    ref = tracking.open_job_run(TrackingConfig(experiment='lifecycle'), name)\n"
        "    print(ref.tracking_uri)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{users}", "ANOMDIFF_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"sqlite:///{users}"] * 3
    store = MlflowClient(tracking_uri=f"sqlite:///{users}")
    runs = store.search_runs([store.get_experiment_by_name("lifecycle").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["first", "second", "third"]
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_checkpoints_are_selected_by_the_weighted_validation_metric():
    from pipelines.train import SELECTION_METRIC, with_selection

    result = {"val_image_auroc": 0.9, "val_pixel_auroc": 0.6}
    assert with_selection(result, 1.0)[SELECTION_METRIC] == pytest.approx(0.9)
    assert with_selection(result, 0.0)[SELECTION_METRIC] == pytest.approx(0.6)
    assert with_selection(result, 0.5)[SELECTION_METRIC] == pytest.approx(0.75)


@pytest.mark.slow
def test_category_names_with_spaces_accents_and_other_scripts_train_evaluate_and_predict(local_ray, tmp_path):
    from layouts import mvtec_tree
    from PIL import Image

    from anomdiff.data.convert import convert
    from pipelines import evaluate, predict, train

    names = ("pièce 1", "零件")
    convert(mvtec_tree(tmp_path / "src", categories=names, train=6), tmp_path / "data", "mvtec", image_size=32,
            workers=1)
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", "model.method=knn", "data.validation_fraction=0.4")
    metadata = train.run(cfg)
    assert sorted(metadata["categories"]) == sorted(names)
    doc = evaluate.evaluate(str(tmp_path / "run" / "model"), str(tmp_path / "data"), str(tmp_path / "report"))
    assert set(doc["per_category"]) == set(names)
    with open(tmp_path / "report" / "images.csv", encoding="utf-8") as f:
        assert {row["category"] for row in csv.DictReader(f)} == set(names)
    Image.new("RGB", (32, 32), (120, 80, 40)).save(tmp_path / "part.png")
    rows = predict.predict(str(tmp_path / "run" / "model"), [str(tmp_path / "part.png")], tmp_path / "predictions")
    assert rows[0]["error"] == "" and rows[0]["decision"] in ("true", "false")
