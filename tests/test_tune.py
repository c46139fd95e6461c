"""``anomdiff tune``: search files checked before Ray, an inference-time search of a shared model
(interrupted and resumed), and a training-time search in which ASHA stops trials early."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from ray.tune import ExperimentAnalysis

from anomdiff.config import CONF_DIR, load_config
from anomdiff.data.synthetic import synthesize
from anomdiff.search import load_search
from pipelines import cli

REPO = Path(__file__).resolve().parents[1]
INFERENCE, TRAINING = CONF_DIR / "tune" / "inference.yaml", CONF_DIR / "tune" / "training.yaml"
TINY = ["model.image_size=32", "model.vae.sample_size=32", "model.unet.sample_size=8", "model.diffusion.ddim_steps=2",
        "model.scoring.noise_samples=1", "train.batch_size=4", "train.steps=4", "train.checkpoint_every=2",
        "train.log_every=2", "train.vae_steps=2", "train.validation_images=4", "data.validation_fraction=0.2",
        "train.num_workers=1", "train.zero.stage=0", "evaluate.batch_size=8"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three synthetic categories whose test shards are garbage: a search that read the test split
    would fail."""
    out = tmp_path_factory.mktemp("tune") / "data"
    synthesize(out, 3, seed=1, image_size=32, train_per_category=10, test_per_category=4, workers=1)
    for shard in out.rglob("split=test/*.parquet"):
        shard.write_bytes(b"not parquet: the test split is never read by a search")
    return out


@pytest.fixture(scope="module")
def model(dataset, tmp_path_factory):
    """A seeded tiny DiAD exported beside its run's config (what a search reads its data from)."""
    from anomdiff.config import save_config
    from pipelines.bench.measure import seeded_model
    from pipelines.data import DataSpec
    from pipelines.train import RESOLVED_CONFIG

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(CONF_DIR / "experiment" / "demo.yaml", [f"data.path={dataset}", f"output_dir={run}", *TINY])
    categories = DataSpec.open(cfg.data, 32).categories
    seeded_model(cfg, len(categories)).save(run / "model", metadata={"categories": categories, "threshold": 1.0,
                                                                      "score_range": [0.0, 2.0]})
    save_config(cfg, run / RESOLVED_CONFIG)
    return run / "model"


@pytest.mark.parametrize(("config", "overrides", "message"), [
    (INFERENCE, ["space={model.diffusion.ddim_stesp: {choice: [1]}}"], "did you mean model.diffusion.ddim_steps?"),
    (INFERENCE, ["space={}"], "space is missing or empty"),
    (INFERENCE, ["metric=val_auroc"], "unknown metric 'val_auroc'"),
    (INFERENCE, ["model={data}"], "is not a saved anomdiff model: config.json is missing"),
    (INFERENCE, ["space={model.diffusion.ddim_steps: {choice: [0, 2]}}"],
     "space.model.diffusion.ddim_steps=0 is outside the key's valid range"),
    (TRAINING, ["data.path={data}", "space={train.lr: {uniform: [-1.0, 1.0]}}"], "space.train.lr=-1.0 is outside"),
    (TRAINING, ["data.path={data}", "model={model}"], "change what a model learns"),
    (TRAINING, ["data.path={data}", "num_trail=3"], "did you mean num_trials?"),
    (TRAINING, ["data.path={data}", "space={train.lr: {loguniform: [0.0, 1.0]}}"], "loguniform needs low > 0"),
])
def test_a_bad_search_file_is_one_line_before_ray_starts(dataset, model, capsys, monkeypatch, config, overrides,
                                                         message):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a bad search"))
    args = [o.replace("{data}", str(dataset)).replace("{model}", str(model)) for o in overrides]
    if config == INFERENCE and not any(a.startswith("model=") for a in args):
        args.append(f"model={model}")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["tune", "--config", str(config), *args])
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("anomdiff: error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_inference_keys_make_an_inference_search_and_any_other_key_a_training_search(dataset, model):
    inference = load_search(INFERENCE, [f"model={model}"])
    assert inference.inference_time and inference.num_trials == 50
    assert inference.score({"val_image_auroc": 0.8, "val_pixel_auroc": 0.6}) == pytest.approx(0.7)
    mixed = load_search(TRAINING, [f"data.path={dataset}"])
    assert not mixed.inference_time and "model.scoring.noise_samples" in mixed.space  # trained with it too
    assert mixed.config({"train.lr": 0.001}).train.lr == 0.001


def _launch_lines(out: Path) -> list[list[str]]:
    path = out / "launches.log"
    return [line.split() for line in path.read_text().splitlines()] if path.is_file() else []


def _launches(out: Path) -> list[str]:
    return [trial for trial, *_ in _launch_lines(out)]


@pytest.mark.slow
def test_an_interrupted_inference_search_resumes_without_rerunning_finished_trials(dataset, model, tmp_path):
    out = tmp_path / "search"
    args = ["--config", str(INFERENCE), f"model={model}", f"output_dir={out}", "num_trials=12",
            "space={model.diffusion.ddim_steps: {choice: [1, 2]}, model.scoring.sigma: {uniform: [1.0, 4.0]}, "
            "model.diffusion.start_timestep: {randint: [100, 401]}}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ANOMDIFF_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # the user's store, exported
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.tune", *args], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(_launches(out)) < 4:
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no trial started in 300 s"
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    try:
        driver.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        pytest.fail("the search did not stop on SIGINT within 120 s")
    assert driver.returncode != 0
    before = _launches(out)
    # Finished: terminated in the search's saved state (a trial that reported but had not yet
    # returned when the signal came is still running there, and Tune rightly runs it again).
    saved = ExperimentAnalysis(str(out / "ray" / "search"))
    finished = {t.trial_id for t in saved.trials if t.status == "TERMINATED"}
    assert 0 < len(before) < 12 and finished

    done = subprocess.run([sys.executable, "-m", "pipelines.tune", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _launches(out)
    assert len(set(after)) == 12
    resumed = _launch_lines(out)[len(before):]
    assert len({pid for *_, pid in resumed}) < len(resumed)  # trial processes reused, not one started per trial
    assert all(after.count(trial) == 1 for trial in finished)  # a finished trial is not launched again

    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(r["status"] == "done" and 0 <= float(r["metric"]) <= 1 for r in rows)
    best = max(rows, key=lambda r: float(r["metric"]))
    saved = json.loads((out / "best_model" / "config.json").read_text())
    assert saved["config"]["diffusion"]["ddim_steps"] == int(best["model.diffusion.ddim_steps"])
    assert saved["config"]["scoring"]["sigma"] == pytest.approx(float(best["model.scoring.sigma"]))
    assert saved["metadata"]["tuned"]["from"] == str(model.resolve())
    assert saved["metadata"]["val_image_auroc"] == pytest.approx(float(best["val_image_auroc"]))
    assert saved["metadata"]["threshold"] != 1.0  # the threshold found under the tuned settings
    assert (out / "figures" / "metric_vs_trial.png").is_file()
    assert (out / "figures" / "metric_vs_model_scoring_sigma.png").is_file()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = (out / "mlflow_run_id").read_text().strip()
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 12 and {c.data.tags["anomdiff.trial"] for c in children} == {r["trial"] for r in rows}
    assert not (tmp_path / "home" / "mlflow.db").exists()


@pytest.mark.slow
def test_a_training_search_runs_one_training_per_trial_and_asha_stops_the_poor_ones(dataset, tmp_path, monkeypatch):
    import ray

    from pipelines import tune

    monkeypatch.setenv("ANOMDIFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the user's store
    out = tmp_path / "search"
    # A seeded grid: the same four trials every run, three of which fall below the first rung's median.
    spec = load_search(TRAINING, [f"data.path={dataset}", f"output_dir={out}", "num_trials=4",
                                  "metric=val_pixel_auroc", "space={seed: {grid: [0, 1, 2, 3]}}", *TINY])
    try:
        best = tune.run(spec)
    finally:
        ray.shutdown()
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and sorted(_launches(out)) == sorted(r["trial"] for r in rows)
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(int(r["steps"]) == 2 for r in stopped)
    assert best["status"] == "done" and (out / "trials" / best["trial"] / "model" / "config.json").is_file()
    # Its checkpoints were kept and exported by the search's metric (pixel AUROC), not image AUROC.
    exported = json.loads((out / "trials" / best["trial"] / "model" / "config.json").read_text())["metadata"]
    assert exported["selection_image_weight"] == 0.0
    assert not (out / "trials" / best["trial"] / "mlflow_model.json").exists()  # its location logged, not a copy
    assert exported["val_selection"] == pytest.approx(exported["val_pixel_auroc"])
    again = load_config(out / "best.yaml")  # a ready-to-run experiment
    assert again.seed == int(best["seed"]) and again.output_dir == str(out / "best_run")
    assert yaml.safe_load((out / "best.yaml").read_text())["data"]["path"] == str(dataset)

    # Every trial's training run, stopped early or not, is a child of the search's run in the one store
    # (the user's), beside the driver's summary run of each trial; nothing went to ANOMDIFF_HOME's.
    assert not (tmp_path / "home" / "mlflow.db").exists()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = (out / "mlflow_run_id").read_text().strip()
    trained = {(out / "trials" / r["trial"] / "mlflow_run_id").read_text().strip() for r in rows}
    assert {mlflow.get_run(run).data.tags.get("mlflow.parentRunId") for run in trained} == {parent}
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    summaries = {c.data.tags["anomdiff.trial"] for c in children if "anomdiff.trial" in c.data.tags}
    assert summaries == {r["trial"] for r in rows}
    assert {c.info.run_id for c in children if "anomdiff.trial" not in c.data.tags} == trained


def test_a_search_resumes_only_as_the_same_search(dataset, model, tmp_path):
    from pipelines.tune import _same_search

    first = load_search(INFERENCE, [f"model={model}", f"output_dir={tmp_path}"])
    _same_search(first, tmp_path)
    _same_search(first, tmp_path)  # the same command again: resumes
    with pytest.raises(FileExistsError, match="holds another search"):
        _same_search(load_search(INFERENCE, [f"model={model}", f"output_dir={tmp_path}", "num_trials=7"]), tmp_path)



@pytest.mark.slow
def test_a_trial_stopped_before_its_first_report_has_its_placement_group_released(tmp_path):
    """The group is known from the file the workers' rank 0 writes as it starts, not from a report."""
    import ray
    from ray.tune.experiment import Trial
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipelines import train, tune

    out = tmp_path / "search"
    folder = tune.trial_folder(out, "t0001")
    folder.mkdir(parents=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        group = placement_group([{"CPU": 0.5}])
        ray.get(group.ready(), timeout=60)
        # What rank 0 of a Train worker does as it starts, inside the worker group's placement group.
        record = ray.remote(num_cpus=0.5)(train._record_placement_group)
        ray.get(record.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group)).remote(str(folder)))
        assert (folder / train.PLACEMENT_GROUP_FILE).read_text() == group.id.hex()

        trial = Trial("training_trial", trial_id="t0001", stub=True)  # stopped before it reported anything
        assert train.PLACEMENT_GROUP not in trial.last_result
        tune.ReleaseStoppedTrainWorkers(out).on_trial_complete(0, [trial], trial)
        assert placement_group_table(group)["state"] == "REMOVED"
        tune.ReleaseStoppedTrainWorkers(out).on_trial_error(0, [trial], trial)  # gone already: left alone
    finally:
        ray.shutdown()
