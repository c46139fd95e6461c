import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anomdiff.data import photos
from anomdiff.data.convert import convert, scan_mvtec
from anomdiff.data.photos import (
    DEFECT_KINDS,
    MARKER,
    MIN_DELTA,
    RESERVED,
    check_allowed,
    make_photo_benchmark,
    render_anomalous,
)

CATS = ("camera", "coffee", "rocket")  # one grayscale, two colour
SIZE, TRAIN, TEST = 32, 4, 10  # 5 anomalous per category: one of each kind


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make(out, **kw):
    args = {"categories": CATS, "seed": 0, "image_size": SIZE, "train_per_category": TRAIN,
            "test_per_category": TEST, **kw}
    return make_photo_benchmark(out, **args)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos") / "bench"
    return out, _make(out)


def test_layout_is_mvtec_and_converts_with_the_right_counts(bench, tmp_path):
    src, summary = bench
    assert summary["total"] == len(CATS) * (TRAIN + TEST)
    assert summary["defects"] == {k: len(CATS) for k in DEFECT_KINDS}
    samples = scan_mvtec(src)
    for cat in CATS:
        mine = [s for s in samples if s.category == cat]
        assert sum(s.split == "train" for s in mine) == TRAIN
        assert sum(s.split == "test" and not s.label for s in mine) == TEST // 2
        anomalous = [s for s in mine if s.label]
        assert sorted(s.defect_type for s in anomalous) == sorted(DEFECT_KINDS)
        for s in anomalous:
            assert s.mask_path.is_file() and s.mask_path.name == f"{s.image_path.stem}_mask.png"
            mask = np.asarray(Image.open(s.mask_path))
            assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
    before = _files(src)
    manifest = convert(src, tmp_path / "data", "mvtec", image_size=SIZE, workers=1)
    assert _files(src) == before  # the source is only read
    assert manifest["counts"] == {c: {"train": {"normal": TRAIN, "anomalous": 0},
                                      "test": {"normal": TEST // 2, "anomalous": TEST // 2}} for c in CATS}


def test_same_seed_same_bytes_other_seed_other_images(bench, tmp_path):
    src, _ = bench
    reference = _files(src)
    _make(tmp_path / "again")
    assert _files(tmp_path / "again") == reference
    _make(tmp_path / "other", seed=1)
    other = _files(tmp_path / "other")
    assert other.keys() == reference.keys()
    images = [k for k in reference if k.endswith(".png") and "ground_truth" not in k]
    assert all(other[k] != reference[k] for k in images)


def test_every_mask_is_exactly_the_changed_pixels(bench):
    src, _ = bench
    for cat in CATS:
        for index in range(TEST // 2):
            clean, defective, mask, kind = render_anomalous(cat, index, seed=0, image_size=SIZE)
            stored = np.asarray(Image.open(src / cat / "test" / kind / f"{index:03d}.png"))
            stored_mask = np.asarray(Image.open(src / cat / "ground_truth" / kind / f"{index:03d}_mask.png")) > 0
            np.testing.assert_array_equal(stored, defective)
            changed = (stored != clean).any(-1)
            np.testing.assert_array_equal(stored_mask, changed)
            assert np.abs(stored.astype(int) - clean.astype(int)).max(-1)[changed].min() >= MIN_DELTA
            assert 4 <= changed.sum() <= 0.10 * SIZE * SIZE
            # The comparison is sharp: a mask one pixel too wide or one pixel off would fail it.
            assert not np.array_equal(ndimage.binary_dilation(stored_mask), changed)
            assert not np.array_equal(np.roll(stored_mask, 1, axis=1), changed)
            if cat == "camera":  # grayscale photographs stay gray, defects included
                assert (stored == stored[..., :1]).all()


def test_reserved_images_are_refused_and_never_opened(tmp_path, monkeypatch):
    assert RESERVED == ("brick", "grass", "gravel", "immunohistochemistry", "moon", "cell")
    for name in (*RESERVED, "ihc.png", "moon.png"):
        with pytest.raises(ValueError, match="reserved"):
            check_allowed(name)
    for name in RESERVED:
        with pytest.raises(ValueError, match="reserved"):
            make_photo_benchmark(tmp_path / name, categories=[name], image_size=SIZE)
        with pytest.raises(ValueError, match="reserved"):
            photos.load_photo(name)
        assert not (tmp_path / name).exists()
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(Path(fp)) or real_open(fp, *a, **k))
    photos.load_photo.cache_clear()
    make_photo_benchmark(tmp_path / "all", image_size=SIZE, train_per_category=1, test_per_category=10)
    photos.load_photo.cache_clear()
    data_dir = photos._skimage_data_dir()
    assert opened and all(p.parent == data_dir for p in opened)  # bundled files only, nothing fetched
    assert not {p.stem for p in opened} & {*RESERVED, "ihc"}


def test_overwrite_replaces_only_a_benchmark_it_wrote(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by make_photo_benchmark"):
        _make(foreign, overwrite=True)
    assert _files(foreign) == {"notes.txt": b"keep me"}
    (foreign / MARKER).write_text(json.dumps({"generator": photos.GENERATOR, "categories": []}))
    with pytest.raises(FileExistsError):  # a marker does not make a folder with foreign files ours
        _make(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "bench"
    _make(out, categories=("coffee",))
    with pytest.raises(FileExistsError, match="already exists"):
        _make(out)
    _make(out, categories=("rocket",), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "rocket"]
    assert json.loads((out / MARKER).read_text())["categories"] == ["rocket"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "mine"]  # no temporary folders left


def test_a_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(photos, "apply_defect", broken)
    with pytest.raises(RuntimeError, match="boom"):
        _make(tmp_path / "bench")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_benchmark_and_names_the_convert_command(tmp_path):
    def anomdiff(*args):
        return subprocess.run([sys.executable, "-m", "pipelines.cli", "data", "photos", *map(str, args)],
                              capture_output=True, text=True)

    done = anomdiff(tmp_path / "b", "--categories", "coins,chelsea", "--image-size", SIZE, "--seed", 3,
                    "--train-per-category", 2, "--test-per-category", 2)
    assert done.returncode == 0, done.stderr
    assert "wrote 8 images in 2 categories" in done.stdout and "anomdiff data convert" in done.stdout
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [MARKER, "chelsea", "coins"]
    refused = anomdiff(tmp_path / "c", "--categories", "moon", "--image-size", SIZE)
    assert refused.returncode == 2 and "reserved" in refused.stderr and "Traceback" not in refused.stderr
