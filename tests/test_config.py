from pathlib import Path

import pytest

from anomdiff.config import CONF_DIR, ExperimentConfig, compose, load_config, parse_override
from anomdiff.sections import UnknownKeyError

DEMO = CONF_DIR / "experiment" / "demo.yaml"


def test_every_experiment_config_in_conf_loads():
    paths = sorted((CONF_DIR / "experiment").glob("*.yaml"))
    assert paths
    for path in paths:
        assert isinstance(load_config(path), ExperimentConfig), path


def test_demo_composes_its_parts_and_overrides_win():
    cfg = load_config(DEMO, ["train.steps=7", "model.trainable=[unet, sg]", "data.num_categories=3"])
    assert cfg.model.method == "diad" and cfg.model.image_size == 64  # from conf/model/tiny.yaml
    assert cfg.train.cpus_per_worker == 0.5  # from conf/train/cpu.yaml
    assert cfg.train.steps == 7 and cfg.model.trainable == ["unet", "sg"] and cfg.data.num_categories == 3


def test_a_mistyped_key_names_itself_and_the_nearest_valid_spelling():
    with pytest.raises(UnknownKeyError, match=r"train\.zero\.stgae; did you mean train\.zero\.stage\?"):
        load_config(DEMO, ["train.zero.stgae=2"])
    with pytest.raises(UnknownKeyError, match=r"unknown config key datta; did you mean data\?"):
        ExperimentConfig.from_dict({"datta": {}})


def test_a_value_of_the_wrong_type_names_its_key():
    with pytest.raises(ValueError, match="train.num_workers: expected an integer"):
        load_config(DEMO, ["train.num_workers=two"])


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="train.zero.stage must be 0-3"):
        load_config(DEMO, ["train.zero.stage=4"])
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\)"):
        load_config(DEMO, ["data.validation_fraction=1.5"])


def test_overrides_must_be_dotted_key_value():
    assert parse_override("a.b=1e-3") == (["a", "b"], "1e-3")
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ValueError, match="dotted.key=value"):
            parse_override(bad)


def test_compose_refuses_an_unknown_part(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("compose: {modle: tiny}\n")
    with pytest.raises(UnknownKeyError, match="compose.modle; did you mean compose.model"):
        compose(path)
    path.write_text("compose: {model: nonexistent}\n")
    with pytest.raises(FileNotFoundError, match="nonexistent.yaml: config file not found"):
        compose(path)


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps must be an integer >= 1, got 0"),
    ("train.steps=-1", "train.steps must be an integer >= 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be"),
    ("train.log_every=0", "train.log_every must be"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be"),
    ("train.lr=nan", "train.lr must be a positive finite number, got nan"),
    ("train.vae_lr=inf", "train.vae_lr must be a positive finite number"),
    ("model.image_size=30", "model.image_size must be a multiple of 16"),
    ("model.image_size=-64", r"model.image_size must be an integer in \[16, 8192\]"),
    ("model.method=dinomaly", "model.method must be one of diad, dpdiff, drdc, knn, proad, got 'dinomaly'"),
    ("evaluate.batch_size=0", "evaluate.batch_size must be"),
    ("train.placement_strategy=spread", "train.placement_strategy must be one of PACK, SPREAD, STRICT_PACK, "
                                        "STRICT_SPREAD, got 'spread'"),
])
def test_values_the_jobs_would_fail_on_inside_ray_are_refused_when_the_config_is_read(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONF_DIR / "experiment" / "demo.yaml", [override])


@pytest.mark.parametrize("text, message", [
    ("compose: [data, model]\n", "compose must map sections to preset names"),
    ('name: !!python/object/apply:os.system ["touch PWNED"]\n', "not valid YAML at line 1.*python/object"),
    ("name: [unclosed\n", "not valid YAML at line 2"),
])
def test_a_broken_experiment_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"broken.yaml: {message}"):
        load_config(path)
    assert not (tmp_path / "PWNED").exists()


def test_every_local_path_a_trial_reads_is_pinned_absolute(tmp_path, monkeypatch):
    from pipelines.runtime import absolute_path_overrides

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    cfg = load_config(CONF_DIR / "experiment" / "demo.yaml", [
        "data.path=data", "output_dir=runs/a", "model.backbone.name=efficientnet_lite0",
        "model.backbone.pretrained=./weights.safetensors", "tracking.tracking_uri=sqlite:///store/mlflow.db"])
    pinned = dict(item.split("=", 1) for item in absolute_path_overrides(cfg))
    assert pinned == {"data.path": str(tmp_path / "data"), "output_dir": str(tmp_path / "runs" / "a"),
                      "model.backbone.pretrained": str(tmp_path / "weights.safetensors"),
                      "tracking.tracking_uri": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"}
    # keywords, Hub ids and absolute store URIs are left as they are
    cfg = load_config(CONF_DIR / "experiment" / "demo.yaml", ["data.path=/d", "output_dir=/o",
                                                              "model.pretrained=org/model",
                                                              "tracking.tracking_uri=sqlite:////abs/m.db"])
    assert absolute_path_overrides(cfg) == ["data.path=/d", "output_dir=/o"]


def test_a_config_error_survives_the_trip_from_a_ray_worker():
    import pickle

    with pytest.raises(UnknownKeyError) as raised:
        ExperimentConfig.from_dict({"train": {"stpes": 1}})
    again = pickle.loads(pickle.dumps(raised.value))
    assert isinstance(again, UnknownKeyError) and str(again) == str(raised.value) and again.suggestion == "steps"


def test_every_jobs_default_output_goes_under_anomdiff_home(tmp_path, monkeypatch):
    """The conf files' ``${ANOMDIFF_HOME}/...`` defaults, the demo's folder, evaluate's folder for a
    registry model and the MLflow store all follow ANOMDIFF_HOME; an explicit path stays as given."""
    from anomdiff.data.synthetic import synthesize
    from anomdiff.models import build_model
    from anomdiff.search import load_search
    from anomdiff.sweep import load_sweep
    from pipelines import demo, evaluate, tracking

    home = tmp_path / "elsewhere" / "home"
    monkeypatch.setenv("ANOMDIFF_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # not ./.anomdiff of the working directory
    synthesize(home / "demo" / "data", 2, seed=0, image_size=32, train_per_category=4, test_per_category=2,
               workers=1)
    cfg = load_config(DEMO)  # train's defaults: the demo dataset in, the run out
    assert (cfg.data.path, cfg.output_dir) == (str(home / "demo" / "data"), str(home / "demo" / "run"))
    assert demo.demo_folder() == home / "demo"
    assert load_search(CONF_DIR / "tune" / "training.yaml").output_dir == str(home / "tune" / "training")
    build_model(cfg.model, 2).save(home / "demo" / "run" / "model", metadata={"categories": ["a", "b"]})
    inference = load_search(CONF_DIR / "tune" / "inference.yaml", ["model=${ANOMDIFF_HOME}/demo/run/model"])
    assert (inference.output_dir, inference.model) == (str(home / "tune" / "inference"),
                                                       str(home / "demo" / "run" / "model"))
    sweep = load_sweep(CONF_DIR / "scale" / "synthetic.yaml")
    assert sweep.output_dir == str(home / "scale" / "synthetic") and sweep.base().data.path == cfg.data.path
    assert evaluate.report_folder("models:/m@champion", None) == home / "evaluations" / "models-m-champion"
    assert evaluate.report_folder("some/run/model", None) == Path("some/run/evaluation")  # beside the model
    assert tracking.tracking_uri() == f"sqlite:///{home / 'mlflow.db'}"
    assert not (tmp_path / ".anomdiff").exists()

    # What the user writes stays as written (resolved against the working directory by the job).
    assert load_config(DEMO, ["output_dir=runs/x", "data.path=data"]).output_dir == "runs/x"
    assert load_search(CONF_DIR / "tune" / "training.yaml", ["output_dir=runs/t"]).output_dir == "runs/t"
    monkeypatch.delenv("ANOMDIFF_HOME")  # unset: ./.anomdiff
    assert load_config(DEMO, ["data.path=data"]).output_dir == str(tmp_path / ".anomdiff" / "demo" / "run")
