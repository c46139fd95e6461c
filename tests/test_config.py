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
