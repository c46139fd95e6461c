"""Careless and hostile input to the converters: nothing lost, nothing silently wrong, one clear error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from layouts import SIZE, mvtec_tree, realiad_tree, visa_tree, write_image
from PIL import Image
from test_convert import rows, snapshot

from anomdiff.atomic import remove_leftovers, replace_directory, staging_directory
from anomdiff.data.convert import LayoutError, convert
from anomdiff.data.images import BadSampleError, decode_mask, decode_rgb, load_mask
from anomdiff.data.manifest import DatasetError, read_manifest, verify
from anomdiff.data.schema import MANIFEST_NAME
from anomdiff.data.writer import OutputExistsError


def dead_pid() -> int:
    """The process id of a process that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


# --- nothing lost ----------------------------------------------------------------------------------


def test_overwrite_never_replaces_the_source_or_a_folder_that_holds_it(tmp_path):
    src = mvtec_tree(tmp_path / "parent" / "src", categories=("bottle",))
    (tmp_path / "parent" / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path / "parent")
    for out in (tmp_path / "parent", src):
        with pytest.raises(OutputExistsError, match="source folder"):
            convert(src, out, "mvtec", image_size=16, overwrite=True, workers=1)
    assert snapshot(tmp_path / "parent") == before


def test_overwrite_replaces_only_a_dataset_folder(tmp_path):
    src = mvtec_tree(tmp_path / "src", categories=("bottle",))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "thesis.tex").write_text("years of work")
    (tmp_path / "file").write_text("a file")
    for out in (plain, tmp_path / "file"):
        with pytest.raises(OutputExistsError, match="not an anomdiff dataset"):
            convert(src, out, "mvtec", image_size=16, overwrite=True, workers=1)
    assert (plain / "thesis.tex").read_text() == "years of work" and (tmp_path / "file").read_text() == "a file"
    convert(src, tmp_path / "data", "mvtec", image_size=16, workers=1)
    convert(src, tmp_path / "data", "mvtec", image_size=24, overwrite=True, workers=1)
    assert read_manifest(tmp_path / "data")["image_size"] == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file", "plain", "src"]


def test_a_failed_conversion_leaves_nothing_and_a_killed_ones_leftovers_go_at_the_next_run(tmp_path):
    src = mvtec_tree(tmp_path / "src", categories=("bottle",))
    (src / "bottle" / "test" / "crack" / "001.png").write_bytes(b"broken")
    with pytest.raises(BadSampleError):
        convert(src, tmp_path / "out", "mvtec", image_size=16, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (tmp_path / f".out.{dead_pid()}.abc123.tmp").mkdir()  # its writer has exited: garbage
    (tmp_path / f".out.{os.getpid()}.live99.tmp").mkdir()  # a running writer's: kept
    (src / "bottle" / "test" / "crack" / "001.png").unlink()
    convert(src, tmp_path / "out", "mvtec", image_size=16, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.{os.getpid()}.live99.tmp", "out", "src"]


def test_a_folder_set_aside_by_a_writer_killed_between_its_renames_is_put_back(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "weights").write_text("old")
    staging = staging_directory(dest)
    (staging / "weights").write_text("new")
    replace_directory(staging, dest)
    assert (dest / "weights").read_text() == "new"
    # What a kill between "old aside" and "new in" leaves: no dest, the old one aside under a dead pid.
    os.replace(dest, tmp_path / f".model.old-{dead_pid()}")
    remove_leftovers(dest)
    assert (dest / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_new_datasets_and_files_honour_the_umask(tmp_path):
    src = mvtec_tree(tmp_path / "src", categories=("bottle",))
    previous = os.umask(0o022)
    try:
        convert(src, tmp_path / "out", "mvtec", image_size=16, workers=1)
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644


# --- nothing silently wrong ------------------------------------------------------------------------


def test_sixteen_bit_images_and_masks_are_scaled_not_clipped(tmp_path):
    src = mvtec_tree(tmp_path / "src", categories=("bottle",), per_defect=1)
    ramp = (np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE) * 40).astype(np.uint16)  # 0..63960
    Image.fromarray(ramp).save(src / "bottle" / "train" / "good" / "000.png")
    mask = np.zeros((SIZE, SIZE), np.uint16)
    mask[:10, :10] = 65535
    Image.fromarray(mask).save(src / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    convert(src, tmp_path / "out", "mvtec", image_size=SIZE, workers=1)
    table = rows(tmp_path / "out")
    image = decode_rgb(next(r for r in table if r["sample_id"] == "bottle/train/good/000")["image"])[..., 0]
    assert image.min() == 0 and 245 <= image.max() <= 250 and len(np.unique(image)) > 200
    defect = next(r for r in table if r["label"])
    assert decode_mask(defect["mask"], SIZE, SIZE).sum() == 100


def test_lossy_masks_are_cut_at_half_range_and_class_id_masks_stay_whole(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[20:29, 20:28] = 255  # 72 pixels
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=75)
    assert abs(int((np.asarray(load_mask(tmp_path / "m.jpg")) > 0).sum()) - 72) <= 8
    assert (np.asarray(Image.open(tmp_path / "m.jpg")) > 0).sum() > 90  # what "> 0" used to keep
    ids = np.zeros((64, 64), np.uint8)
    ids[:4, :4], ids[10:12, 10:12] = 1, 3
    Image.fromarray(ids).save(tmp_path / "ids.png")
    assert (np.asarray(load_mask(tmp_path / "ids.png")) > 0).sum() == 20


def test_an_anomalous_image_with_an_empty_mask_is_refused_or_skipped(tmp_path):
    src = mvtec_tree(tmp_path / "src", categories=("bottle",))
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(src / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    with pytest.raises(BadSampleError, match="000_mask.png: the mask of anomalous image 000.png is empty"):
        convert(src, tmp_path / "out", "mvtec", image_size=16, workers=1)
    manifest = convert(src, tmp_path / "out", "mvtec", image_size=16, skip_bad=True, workers=1)
    assert manifest["rejected"] == 1 and manifest["counts"]["bottle"]["test"]["anomalous"] == 1


def test_skip_bad_may_not_leave_a_category_without_training_images(tmp_path):
    src = mvtec_tree(tmp_path / "src", categories=("bottle", "cable"))
    for p in (src / "cable" / "train" / "good").iterdir():
        p.write_bytes(b"broken")
    with pytest.raises(ValueError, match="category cable would have no training images"):
        convert(src, tmp_path / "out", "mvtec", image_size=16, skip_bad=True, workers=1)
    assert not (tmp_path / "out").exists()


def test_hidden_files_are_not_images(tmp_path):
    src = mvtec_tree(tmp_path / "src", categories=("bottle",))
    (src / "bottle" / "train" / "good" / "._000.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    manifest = convert(src, tmp_path / "out", "mvtec", image_size=16, workers=1)
    assert manifest["counts"]["bottle"]["train"]["normal"] == 3


def test_paths_that_lead_outside_the_source_are_refused(tmp_path):
    secret = write_image(tmp_path / "elsewhere" / "secret.png", 9)
    src = mvtec_tree(tmp_path / "src", categories=("bottle",))
    (src / "bottle" / "train" / "good" / "003.png").symlink_to(secret)
    with pytest.raises(BadSampleError, match="outside the source folder"):
        convert(src, tmp_path / "out", "mvtec", image_size=16, workers=1)
    manifest = convert(src, tmp_path / "out", "mvtec", image_size=16, skip_bad=True, workers=1)
    assert manifest["rejected"] == 1 and manifest["counts"]["bottle"]["train"]["normal"] == 3
    visa = visa_tree(tmp_path / "visa")
    table = visa / "split_csv" / "1cls.csv"
    lines = table.read_text().splitlines()
    lines[1] = lines[1].replace(lines[1].split(",")[3], "../elsewhere/secret.png")
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSampleError, match="outside the source folder"):
        convert(visa, tmp_path / "visa-out", "visa", image_size=16, workers=1)


def test_a_decompression_bomb_is_a_bad_image_that_skip_bad_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # Pillow refuses images over twice this
    src = mvtec_tree(tmp_path / "src", categories=("bottle",))
    write_image(src / "bottle" / "train" / "good" / "003.png", 7, size=100)  # 10,000 pixels: a "bomb"
    with pytest.raises(BadSampleError, match="003.png: image too large to decode safely"):
        convert(src, tmp_path / "out", "mvtec", image_size=16, workers=1)
    manifest = convert(src, tmp_path / "out", "mvtec", image_size=16, skip_bad=True, workers=1)
    assert manifest["rejected"] == 1 and manifest["counts"]["bottle"]["train"]["normal"] == 3


def test_malformed_split_files_name_the_file_and_the_row(tmp_path):
    visa = visa_tree(tmp_path / "visa")
    table = visa / "split_csv" / "1cls.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join([*lines[:2], "candle,train", *lines[2:]]) + "\n")
    with pytest.raises(LayoutError, match=r"1cls.csv:3: expected 5 fields"):
        convert(visa, tmp_path / "out", "visa", workers=1)
    realiad = realiad_tree(tmp_path / "realiad")
    json_file = next((realiad / "realiad_jsons" / "realiad_jsons").glob("*.json"))
    json_file.write_text(json.dumps([1, 2]))
    with pytest.raises(LayoutError, match=f"{json_file.name}: expected an object"):
        convert(realiad, tmp_path / "out", "realiad", workers=1)


# --- manifests ------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path):
    convert(mvtec_tree(tmp_path / "src", categories=("bottle",)), tmp_path / "data", "mvtec", image_size=16, workers=1)
    return tmp_path / "data"


def _edit_manifest(data, change):
    doc = json.loads((data / MANIFEST_NAME).read_text())
    change(doc)
    (data / MANIFEST_NAME).write_text(json.dumps(doc))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(counts=[1, 2]), "counts must map each category"),
    (lambda d: d.pop("total"), "missing key 'total'"),
    (lambda d: d.update(total=99999), "total is 99999 but the counts add up to 7"),
    (lambda d: d["counts"]["bottle"]["train"].update(normal=4000), r"total is 7 but the counts add up to 4004"),
    (lambda d: d["shards"][0].update(path="../../etc/passwd"), "leaves the dataset folder"),
    (lambda d: d["shards"][0].update(path="/etc/passwd"), "leaves the dataset folder"),
    (lambda d: d["counts"]["bottle"]["train"].update(normal="3"), "must be a count"),
])
def test_a_malformed_manifest_is_named_with_its_key(dataset, change, message):
    _edit_manifest(dataset, change)
    with pytest.raises(DatasetError, match=message):
        read_manifest(dataset)


def test_verify_checks_the_counts_against_the_labels_the_shards_hold(dataset):
    def swap(doc):
        test = doc["counts"]["bottle"]["test"]
        test["normal"], test["anomalous"] = test["anomalous"] + 1, test["normal"] - 1
    assert verify(dataset) == []
    _edit_manifest(dataset, swap)
    problems = verify(dataset)
    assert len(problems) == 1 and "counts.bottle.test" in problems[0] and "the shards hold" in problems[0]


def test_a_dataset_written_with_the_older_manifest_name_is_still_read(dataset):
    os.replace(dataset / MANIFEST_NAME, dataset / "manifest.json")
    assert read_manifest(dataset)["total"] == 7 and verify(dataset) == []


# --- trust --------------------------------------------------------------------------------------


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this runs code: it would write the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_planted_checkpoint_cannot_run_code_at_export(tmp_path, zero_stage):
    import torch

    from pipelines.train import consolidated_state_dict

    marker = tmp_path / "pwned"
    (tmp_path / "ds").mkdir()
    (tmp_path / "latest").write_text("ds")
    payload = {"module": {"w": torch.zeros(1)}, "buffer_names": [], "param_shapes": [{}], "planted": _Planted(marker)}
    torch.save(payload, tmp_path / "ds" / "mp_rank_00_model_states.pt")
    if zero_stage:
        torch.save({"optimizer_state_dict": {"zero_stage": 2, "planted": _Planted(marker)}},
                   tmp_path / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(Exception) as refused:
        consolidated_state_dict(tmp_path, zero_stage)
    assert not marker.exists()
    assert "weights_only" in str(refused.value) or "Unsupported global" in str(refused.value)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the guard does not leak


@pytest.fixture(scope="module")
def saved_knn(tmp_path_factory):
    import torch

    from anomdiff.models import build_model
    from anomdiff.models.config import ModelConfig, load_preset

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({"method": "knn", "image_size": 32}, base=load_preset("tiny")), 2)
    model.memory = torch.randn(10, model.memory.shape[1])
    model.memory_category = torch.zeros(10, dtype=torch.long)
    return model.save(tmp_path_factory.mktemp("knn") / "model")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(num_categories=10**12), r"num_categories must be an integer in \[1, 100000\]"),
    (lambda c: c["config"].update(image_size=-64), "model.image_size must be an integer"),
    (lambda c: c["config"].update(image_size=10**9), "model.image_size must be an integer"),
    (lambda c: c["config"]["backbone"].update(name="hf-hub:timm/resnet18.a1_in1k"), "must be a timm architecture"),
    (lambda c: c.update(config=[1]), "expected an object with method"),
])
def test_a_tampered_saved_config_is_refused_before_anything_is_built(saved_knn, tmp_path, change, message):
    import shutil

    from anomdiff.models import load_model

    folder = shutil.copytree(saved_knn, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_model(folder)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_weights_of_another_dtype_or_shape_are_named_at_load(saved_knn, tmp_path, dtype):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from anomdiff.models import load_model

    folder = shutil.copytree(saved_knn, tmp_path / "model")
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()},
              folder / "model.safetensors")
    with pytest.raises(ValueError, match=f"model.safetensors: .* is {'F64' if dtype == 'float64' else 'F16'}"):
        load_model(folder)
    state["memory"] = torch.zeros(10, 7)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"memory has shape \[10, 7\]"):
        load_model(folder)
    assert load_model(saved_knn).memory.shape[0] == 10
