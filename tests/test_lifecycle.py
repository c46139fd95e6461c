"""The model in MLflow: logged as a pyfunc from code, registered, promoted behind the gate, rolled
back, found again by ``models:/`` URIs, scored by ``anomdiff predict`` and by a real
``mlflow models serve``."""

import base64
import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib
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
    config carries ``tracking.gate``, which no promotion may read) and register it; returns the version."""
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


def evaluated(tmp_path, version: str, image: float, pixel: float, data: str = "/data/test-set") -> None:
    """Record test metrics on version ``version`` of ``m``, as ``anomdiff evaluate`` does."""
    model = registry.ResolvedModel(tmp_path, None, "m", version)
    registry.link_evaluation(model, {"mean": {"image_auroc": image, "pixel_auroc": pixel, "aupro": 0.5}},
                             f"eval-{version}", data)


def test_the_gate_promotes_refuses_a_worse_candidate_and_a_forced_rollback_needs_a_reason(store, tmp_path):
    first = register(store, tmp_path, "m", 0.90, 0.85, seed=0)
    client = MlflowClient()
    assert promote.promote("m", dry_run=True)["failures"] == [
        "no test metrics recorded on the candidate: run anomdiff evaluate on it first"]  # champion needs test
    evaluated(tmp_path, first, 0.88, 0.84)
    decision = promote.promote("m")
    assert decision["decision"] == "promoted" and champion(client) == first

    worse = register(store, tmp_path, "m", 0.80, 0.86, seed=1)  # image AUROC 0.10 below the champion's
    evaluated(tmp_path, worse, 0.87, 0.85)
    assert promote.promote("m", dry_run=True)["decision"] == "refused"
    assert "challenger" not in client.get_registered_model("m").aliases  # a dry run changes nothing
    refused = promote.promote("m")
    assert refused["decision"] == "refused" and any("val_image_auroc 0.8000 < best champion on record 0.9000"
                                                    in f for f in refused["failures"])
    aliases = client.get_registered_model("m").aliases
    assert str(aliases["champion"]) == first and str(aliases["challenger"]) == worse
    recorded = client.get_model_version("m", worse).tags
    assert recorded["promotion.decision"] == "refused"
    assert json.loads(recorded["promotion.champion"])["champion"]["val_image_auroc"] == 0.90

    # A promotion's own options only tighten the gate: a looser tolerance is ignored...
    assert promote.promote("m", gate_overrides={"tolerance": 0.15})["decision"] == "refused"
    # ...the registered model's owner loosens it, on the record.
    promote.set_policy("m", {"min_pixel_auroc": 0.6})
    policy = promote.set_policy("m", {"tolerance": 0.15})  # one value changed, the others kept
    assert policy["tolerance"] == 0.15 and policy["min_pixel_auroc"] == 0.6 and policy["set_by"]
    with pytest.raises(ValueError, match="no registered model 'nothing'"):
        promote.set_policy("nothing", {"tolerance": 0.1})
    assert promote.promote("m")["decision"] == "promoted" and champion(client) == worse

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


def test_a_candidates_own_config_never_sets_its_bar(store, tmp_path):
    low = register(store, tmp_path, "m", 0.45, 0.70, seed=0, min_image_auroc=0.0, tolerance=1.0)
    evaluated(tmp_path, low, 0.6, 0.6)
    refused = promote.promote("m")  # the defaults apply: floor 0.5, whatever its training config said
    assert refused["decision"] == "refused" and refused["failures"] == ["val_image_auroc 0.4500 < floor 0.5000"]


def test_a_new_champion_is_evaluated_on_the_champions_test_data_and_covers_its_categories(store, tmp_path):
    first = register(store, tmp_path, "m", 0.90, 0.90, seed=0)
    evaluated(tmp_path, first, 0.9, 0.9, data="/data/a")
    assert promote.promote("m")["decision"] == "promoted"
    other = register(store, tmp_path, "m", 0.95, 0.95, seed=1)
    evaluated(tmp_path, other, 0.99, 0.99, data="/data/easier")
    assert any("evaluate the candidate on the champion's test data" in f for f in promote.promote("m")["failures"])
    MlflowClient().set_model_version_tag("m", other, "categories", json.dumps(CATEGORIES[:1]))
    evaluated(tmp_path, other, 0.95, 0.95, data="/data/a")
    assert any(f"the champion's categories {sorted(CATEGORIES[1:])}" in f for f in promote.promote("m")["failures"])


def test_a_chain_of_slightly_worse_promotions_loses_at_most_one_tolerance(store, tmp_path):
    """Five versions, each 0.008 worse than the last, promoted in turn under a tolerance of 0.01:
    compared with the holder, each would pass and the champion would fall by 0.032; compared with the
    best champion on record, the third is refused and the fall stops at 0.008."""
    values = [0.90 - 0.008 * i for i in range(5)]
    for i, value in enumerate(values):
        version = register(store, tmp_path, "m", value, value, seed=i)
        evaluated(tmp_path, version, value, value)
        promote.promote("m")
    client = MlflowClient()  # made now: the store is chosen when the first job opens its run
    held = client.get_model_version("m", champion(client)).tags
    assert values[0] - float(held["val_image_auroc"]) == pytest.approx(0.008, abs=1e-6)


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
    evaluated(tmp_path, version, 0.9, 0.9)  # a champion needs test metrics
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


def bomb_png(side: int = 50_000) -> bytes:
    """A PNG whose header claims ``side`` x ``side`` pixels (2.5 G) in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def request_body(images: list, columns=("image",), **params) -> bytes:
    return json.dumps({"dataframe_split": {"columns": list(columns), "data": [[i] for i in images]},
                       **({"params": params} if params else {})}).encode()


@pytest.mark.slow
def test_the_served_champion_answers_as_predict_does_and_bad_requests_get_400(store, tmp_path):
    """``mlflow models serve`` of the champion, started outside the checkout: the scores of
    ``predict``; every bad request a 400 whose message says what is wrong, and the next good
    request answered."""
    from pipelines.bench.serving import ask, model_server

    evaluated(tmp_path, register(store, tmp_path, "m", 0.9, 0.9), 0.9, 0.9)  # a champion needs test metrics
    promote.promote("m")
    paths = write_images(tmp_path / "images")[:3]
    expected = {r["path"]: float(r["score"]) for r in predict("models:/m@champion", [str(p) for p in paths],
                                                                tmp_path / "out", overlays=False, progress=False)}
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    (tmp_path / "elsewhere").mkdir()
    bad = {
        "malformed JSON": (b'{"dataframe_split": {"columns": ["image"], "data": [[', "Invalid input"),
        "bad base64": (request_body(["not base64 at all!"]), "image: not base64"),
        "not an image": (request_body([base64.b64encode(b"hello, world").decode()]), "image: "),
        "decompression bomb": (request_body([base64.b64encode(bomb_png()).decode()]), "image: "),
        "50 MB payload": (request_body([base64.b64encode(os.urandom(50 * 2**20)).decode()]), "image: "),
        "wrong column": (request_body(encoded[:1], columns=("picture",)), "Model is missing inputs ['image']"),
        "wrong type": (request_body([12345]), "image: a base64 string is needed, got int"),
    }
    with model_server("models:/m@champion", mlflow.get_tracking_uri(), cwd=tmp_path / "elsewhere") as (port, _):
        status, answer = ask(port, request_body(encoded, return_map=True))
        answered = {}
        for name, (body, _) in bad.items():
            answered[name] = ask(port, body)
            assert ask(port, request_body(encoded[:1]))[0] == 200, f"not serving after the {name}"
    assert status == 200
    answers = answer["predictions"]
    assert [a["score"] for a in answers] == pytest.approx([expected[str(p)] for p in paths], rel=1e-5)
    assert [a["decision"] for a in answers] == [expected[str(p)] >= 1.0 for p in paths]
    gray = Image.open(io.BytesIO(paths[1].read_bytes()))
    assert np.asarray(answers[1]["anomaly_map"]).shape == (gray.height, gray.width)
    for name, (_, message) in bad.items():
        status, error = answered[name]
        assert status == 400 and message in error.get("message", ""), (name, status, str(error)[:500])
        assert "Traceback" not in error.get("message", ""), name


def test_a_logged_model_loads_and_scores_where_this_repository_is_not_importable(store, tmp_path):
    """The model's code travels with it (code_paths): a fresh process whose working directory and
    import path exclude the checkout and its editable install loads it and scores an image."""
    version = register(store, tmp_path, "m", 0.9, 0.8)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/m/{version}", dst_path=str(tmp_path / "dl")))
    requirements = (local / "requirements.txt").read_text()
    assert "accelerate==" in requirements and "diffusers==" in requirements
    checkout = str(Path(__file__).resolve().parents[1])
    script = f"""
import sys
sys.path = [p for p in sys.path if p not in ("", ".", {checkout!r})
            and not (p.startswith({checkout!r} + "/") and "site-packages" not in p)]
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__name__", type(f).__name__).lower()
                 and "editable" not in type(f).__module__.lower()]
for name in [m for m in sys.modules if m == "anomdiff" or m.startswith("anomdiff.")]:
    del sys.modules[name]
try:
    import anomdiff  # noqa: F401
    raise SystemExit("anomdiff is importable without the model's code")
except ImportError:
    pass
import mlflow.pyfunc, pandas as pd, numpy as np, io, base64
from PIL import Image
model = mlflow.pyfunc.load_model({str(local)!r})
import anomdiff
assert anomdiff.__file__.startswith({str(local)!r}), anomdiff.__file__
buffer = io.BytesIO(); Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buffer, format="PNG")
answer = model.predict(pd.DataFrame({{"image": [base64.b64encode(buffer.getvalue()).decode()]}}))
print("score", float(answer["score"][0]))
"""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=outside, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("score ")


def test_a_folder_registers_in_one_command_and_can_then_be_promoted(store, tmp_path, capsys):
    folder = tmp_path / "search" / "best_model"
    noise_bank_knn(32, len(CATEGORIES)).save(folder, metadata={"categories": CATEGORIES, "threshold": 1.0,
                                                               "score_range": [0.0, 4.0], "val_image_auroc": 0.9,
                                                               "val_pixel_auroc": 0.9})
    cli.main(["register", str(folder), "m"])
    assert "registered" in capsys.readouterr().out
    client = MlflowClient()
    [registered] = client.search_model_versions("name = 'm'")
    assert float(registered.tags["val_image_auroc"]) == 0.9
    assert json.loads(registered.tags["categories"]) == CATEGORIES
    with pytest.raises(SystemExit):  # not an exported model: one line
        cli.main(["register", str(tmp_path), "m"])
    assert "config.json" in capsys.readouterr().err
