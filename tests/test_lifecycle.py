"""The model in MLflow: logged as a pyfunc from code, registered, promoted behind the gate, rolled
back, found again by ``models:/`` URIs, scored by ``anomdiff predict`` and by a real
``mlflow models serve``."""

import base64
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from samples import noise_bank_knn

from anomdiff.pyfunc_model import encode_base64_png
from pipelines import cli, promote, registry, tracking
from pipelines.predict import predict

CATEGORIES = ["bottle", "cable"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite store under ANOMDIFF_HOME, and a job run to log models into."""
    monkeypatch.setenv("ANOMDIFF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from anomdiff.config import TrackingConfig

    yield TrackingConfig(experiment="lifecycle")
    if mlflow.active_run():
        mlflow.end_run()


def register(store, tmp_path, name: str, val_image: float, val_pixel: float, seed: int = 0, **gate) -> str:
    """Save a knn model with these validation metrics, log it in a training run of its own (whose
    config carries ``tracking.gate``) and register it; returns the version."""
    model = noise_bank_knn(32, len(CATEGORIES), seed=seed)
    folder = tmp_path / f"run-{seed}" / "model"
    model.save(folder, metadata={"categories": CATEGORIES, "threshold": 1.0, "score_range": [0.0, 4.0],
                                 "val_image_auroc": val_image, "val_pixel_auroc": val_pixel, "experiment": "t"})
    ref = tracking.open_job_run(store, f"train {seed}")
    with tracking.resume(ref):
        mlflow.log_params({f"tracking.gate.{key}": value for key, value in gate.items()})
        _, version = registry.log_exported_model(folder, name)
    return version


def test_a_logged_model_holds_code_and_safetensors_only_and_scores_like_the_exported_folder(store, tmp_path):
    version = register(store, tmp_path, "m", 0.9, 0.8)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/m/{version}", dst_path=str(tmp_path / "dl")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "artifacts/model/model.safetensors" in files and "artifacts/model/config.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))]  # no pickled object
    loaded = mlflow.pyfunc.load_model(f"models:/m/{version}")
    assert loaded.metadata.metadata["categories"] == CATEGORIES and loaded.metadata.metadata["threshold"] == 1.0
    assert loaded.metadata.get_input_schema().input_names() == ["image", "category"]
    tags = MlflowClient().get_model_version("m", version).tags
    assert float(tags["val_image_auroc"]) == 0.9 and float(tags["val_pixel_auroc"]) == 0.8

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), np.uint8), rng.integers(0, 256, (32, 32, 3), np.uint8)]
    frame = pd.DataFrame({"image": [encode_base64_png(im) for im in images]})
    answer = loaded.predict(frame, params={"return_map": True})
    from anomdiff.inference import ImageScorer

    direct = ImageScorer(tmp_path / "run-0" / "model").score(images)
    assert answer["score"].tolist() == pytest.approx([p.score for p in direct], rel=1e-6)
    assert np.asarray(answer["anomaly_map"][0]).shape == (40, 56)  # the map at the image's own size


def champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias("m", "champion").version)


def test_the_gate_promotes_refuses_a_worse_candidate_and_a_forced_rollback_needs_a_reason(store, tmp_path):
    first = register(store, tmp_path, "m", 0.90, 0.85, seed=0)
    client = MlflowClient()
    decision = promote.promote("m")
    assert decision["decision"] == "promoted" and champion(client) == first

    worse = register(store, tmp_path, "m", 0.80, 0.86, seed=1)  # image AUROC 0.10 below the champion's
    assert promote.promote("m", dry_run=True)["decision"] == "refused"
    assert "challenger" not in client.get_registered_model("m").aliases  # a dry run changes nothing
    refused = promote.promote("m")
    assert refused["decision"] == "refused" and any("val_image_auroc 0.8000 < champion's" in f
                                                    for f in refused["failures"])
    aliases = client.get_registered_model("m").aliases
    assert str(aliases["champion"]) == first and str(aliases["challenger"]) == worse
    recorded = client.get_model_version("m", worse).tags
    assert recorded["promotion.decision"] == "refused"
    assert json.loads(recorded["promotion.champion"])["champion"]["val_image_auroc"] == 0.90

    # Within the tolerance the same candidate passes.
    assert promote.promote("m", gate_overrides={"tolerance": 0.15})["decision"] == "promoted"
    assert champion(client) == worse

    # Rolling back to version 1 against a gate it fails (its validation image AUROC is below the floor
    # asked for): refused without --force, forced with a reason.
    strict = {"min_image_auroc": 0.95}
    assert promote.promote("m", version=first, gate_overrides=strict)["decision"] == "refused"
    assert champion(client) == worse
    with pytest.raises(ValueError, match="--force needs --reason"):
        promote.promote("m", version=first, force=True, gate_overrides=strict)
    rolled = promote.promote("m", version=first, force=True, reason="v2 misses scratches", gate_overrides=strict)
    assert rolled["decision"] == "forced" and rolled["previous"] == worse and champion(client) == first
    record = client.get_model_version("m", first).tags
    assert record["promotion.decision"] == "forced"
    assert json.loads(record["promotion.champion"])["reason"] == "v2 misses scratches"


def test_the_gate_reads_floors_from_the_training_config_and_test_metrics_once_evaluated(store, tmp_path):
    low = register(store, tmp_path, "m", 0.70, 0.70, seed=0, min_image_auroc=0.75)
    refused = promote.promote("m")
    assert refused["decision"] == "refused" and refused["failures"] == ["val_image_auroc 0.7000 < floor 0.7500"]
    assert promote.promote("m", gate_overrides={"min_image_auroc": 0.6})["decision"] == "promoted"

    good = register(store, tmp_path, "m", 0.95, 0.95, seed=1)
    evaluated = registry.ResolvedModel(tmp_path, None, "m", good)
    registry.link_evaluation(evaluated, {"mean": {"image_auroc": 0.40, "pixel_auroc": 0.9, "aupro": 0.5}}, "eval-run")
    refused = promote.promote("m")
    assert refused["failures"] == ["test_image_auroc 0.4000 < floor 0.5000"]
    assert champion(MlflowClient()) == low


def write_images(folder: Path) -> list[Path]:
    """A colour PNG, a grayscale JPEG, an RGBA PNG of other sizes, and a corrupt file."""
    rng = np.random.default_rng(1)
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.png", folder / "sub" / "gray.jpg", folder / "sub" / "rgba.png", folder / "broken.png"]
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (40, 40), np.uint8)).save(paths[1])
    Image.fromarray(rng.integers(0, 256, (20, 30, 4), np.uint8)).save(paths[2])
    paths[3].write_bytes(b"\x89PNG not really")
    (folder / ".hidden.png").write_bytes(b"skipped")
    return paths


def test_predict_from_the_champion_writes_scores_decisions_overlays_and_a_row_per_broken_file(store, tmp_path):
    version = register(store, tmp_path, "m", 0.9, 0.9)
    promote.promote("m")
    paths = write_images(tmp_path / "images")
    rows = predict("models:/m@champion", [str(tmp_path / "images")], tmp_path / "out", batch_size=2, progress=False)
    with open(tmp_path / "out" / "predictions.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["path"] for r in written] == [str(p) for p in sorted(paths)] and written == rows
    broken = next(r for r in written if r["path"].endswith("broken.png"))
    assert broken["score"] == "" and "broken.png: unreadable" in broken["error"]
    scored = [r for r in written if not r["error"]]
    assert len(scored) == 3 and all(r["decision"] == ("true" if float(r["score"]) >= 1.0 else "false") for r in scored)
    overlays = sorted((tmp_path / "out" / "overlays").iterdir())
    assert len(overlays) == 3
    assert Image.open(overlays[0]).size == (3 * 64, 48)  # a.png: image | heatmap | outline at its own size

    # The same images one at a time, from the version number and from the logged model's own URI
    # (MLflow 3's models:/m-<id>): the same scores.
    logged = MlflowClient().get_model_version("m", version).source
    for uri in (f"models:/m/{version}", logged):
        one = predict(uri, [str(p) for p in paths[:3]], tmp_path / "one", batch_size=1, overlays=False,
                      progress=False)
        assert {r["path"]: r["score"] for r in one} == {r["path"]: r["score"] for r in scored}


@pytest.mark.parametrize(("argv", "message"), [
    (["predict", "models:/nobody@champion", "{images}", "--out", "{out}"], "no registered model 'nobody'"),
    (["predict", "models:/m@gold", "{images}", "--out", "{out}"], "model 'm' has no alias 'gold' (aliases: none)"),
    (["predict", "runs:/{run}/model", "{images}", "--out", "{out}"], "no logged anomdiff model there"),
    (["predict", "models:/m/1", "{empty}", "--out", "{out}"], "no image files in this folder"),
    (["predict", "models:/m/1", "{images}", "--out", "{out}", "--category", "screw"],
     "category 'screw' is not among the model's 2 categories (bottle, cable)"),
    (["promote", "m", "--force"], "--force needs --reason"),
    (["promote", "nobody"], "no registered model 'nobody'"),
])
def test_bad_input_is_one_line_naming_what_is_wrong(store, tmp_path, capsys, argv, message):
    register(store, tmp_path, "m", 0.9, 0.9)
    run = tracking.open_job_run(store, "no model here")  # a run that logged no model
    write_images(tmp_path / "images")
    (tmp_path / "empty").mkdir()
    names = {"images": tmp_path / "images", "empty": tmp_path / "empty", "out": tmp_path / "out", "run": run.run_id}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.main([a.format(**names) for a in argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("anomdiff: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_served_champion_answers_as_predict_does(store, tmp_path):
    register(store, tmp_path, "m", 0.9, 0.9)
    promote.promote("m")
    paths = write_images(tmp_path / "images")[:3]
    expected = {r["path"]: float(r["score"]) for r in predict("models:/m@champion", [str(p) for p in paths],
                                                                tmp_path / "out", overlays=False, progress=False)}
    port, bin_dir = free_port(), str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    server = subprocess.Popen([f"{bin_dir}/mlflow", "models", "serve", "-m", "models:/m@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the model server did not answer /ping in 120 s"
                time.sleep(1)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()]
                                                                    for p in paths]},
                "params": {"return_map": True}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                          {"Content-Type": "application/json"})
        answers = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert [a["score"] for a in answers] == pytest.approx([expected[str(p)] for p in paths], rel=1e-5)
    assert [a["decision"] for a in answers] == [expected[str(p)] >= 1.0 for p in paths]
    gray = Image.open(io.BytesIO(paths[1].read_bytes()))
    assert np.asarray(answers[1]["anomaly_map"]).shape == (gray.height, gray.width)
