import json
import subprocess
import sys

import yaml
from layouts import mvtec_tree


def anomdiff(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_synth_then_inspect_json_prints_the_design_document(tmp_path):
    done = anomdiff("data", "synth", tmp_path / "d", "--categories", 3, "--image-size", 24,
                    "--train-per-category", 4, "--test-per-category", 2, "--workers", 1)
    assert done.returncode == 0, done.stderr
    inspect = anomdiff("data", "inspect", tmp_path / "d", "--json", "--verify")
    assert inspect.returncode == 0, inspect.stderr
    doc = json.loads(inspect.stdout)
    assert doc["total"] == 18 and len(doc["categories"]) == 3
    assert all(c == {"train": {"normal": 4}, "test": {"normal": 1, "anomalous": 1}} for c in doc["categories"].values())


def test_convert_refuses_an_existing_output_without_overwrite(tmp_path):
    src = mvtec_tree(tmp_path / "src", categories=("bottle",))
    assert anomdiff("data", "convert", src, tmp_path / "out", "--format", "mvtec", "--image-size", 16).returncode == 0
    again = anomdiff("data", "convert", src, tmp_path / "out", "--format", "mvtec")
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    assert anomdiff("data", "convert", src, tmp_path / "out", "--format", "mvtec", "--overwrite").returncode == 0


def test_bad_input_exits_non_zero_with_one_line_naming_the_file(tmp_path):
    src = mvtec_tree(tmp_path / "src", categories=("bottle",))
    (src / "bottle" / "test" / "crack" / "001.png").write_bytes(b"\x89PNG\r\n")
    done = anomdiff("data", "convert", src, tmp_path / "out", "--format", "mvtec")
    assert done.returncode == 2
    assert "crack/001.png: unreadable or truncated image" in done.stderr and "Traceback" not in done.stderr
    skipped = anomdiff("data", "convert", src, tmp_path / "out", "--format", "mvtec", "--skip-bad")
    assert skipped.returncode == 0 and "left out 1 bad samples" in skipped.stdout


def test_inspect_verify_fails_on_a_modified_shard(tmp_path):
    assert anomdiff("data", "synth", tmp_path / "d", "--categories", 1, "--image-size", 16,
                    "--train-per-category", 2, "--test-per-category", 2).returncode == 0
    shard = next((tmp_path / "d").rglob("*.parquet"))
    shard.write_bytes(shard.read_bytes() + b"x")
    done = anomdiff("data", "inspect", tmp_path / "d", "--verify")
    assert done.returncode == 1 and "sha256 mismatch" in done.stderr


def test_model_params_prints_the_sd15_counts_of_design_md():
    done = anomdiff("model", "params", "--preset", "sd15", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"unet": 859520964, "sg": 471871120, "vae": 83653863, "prototypes": 0,
                                       "total": 1415045947}


def test_every_command_says_what_it_does_in_its_help_line():
    done = anomdiff("--help")
    assert done.returncode == 0
    for command in ("train", "evaluate", "predict", "demo", "tune", "scale", "promote", "bench"):
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(command + " "))
        assert "python -m" not in line and len(line.split()) > 4


def test_print_config_shows_the_resolved_experiment_with_overrides_after_the_options(tmp_path):
    done = anomdiff("train", "--config", "conf/experiment/demo.yaml", "--print-config", "train.steps=7",
                    f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load(done.stdout)
    assert doc["train"]["steps"] == 7 and doc["model"]["backbone"]["pretrained"] == "imagenet"
    assert not (tmp_path / "run").exists()  # printed, not run
    wrong = anomdiff("train", "--config", "conf/experiment/demo.yaml", "--print-config", "train.stpes=7")
    assert wrong.returncode == 2 and "did you mean train.steps" in wrong.stderr


def test_evaluate_takes_overrides_after_its_options(tmp_path):
    # argparse without intermixed parsing refused this as "unrecognized arguments"; now it reaches
    # the job, which names the missing model
    done = anomdiff("evaluate", tmp_path / "nomodel", tmp_path / "nodata", "--json", tmp_path / "m.json",
                    "model.scoring.sigma=0")
    assert "unrecognized arguments" not in done.stderr
    assert done.returncode == 2 and "nomodel" in done.stderr
