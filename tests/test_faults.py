"""Fault injection: a process SIGKILLed at chosen points of a conversion, a model export and a
report; afterwards nothing is lost or half-written, and the same command run again completes.

Each victim is a child Python process that patches one function of the library to SIGKILL itself
when reached, then runs the real code path; no test hook lives in the library."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from layouts import mvtec_tree

from anomdiff.atomic import remove_leftovers
from anomdiff.data.convert import convert
from anomdiff.data.manifest import read_manifest, verify

TESTS = Path(__file__).parent


def killed_at(setup: str, run: str, tmp_path: Path) -> None:
    """Run ``setup`` (which patches the kill point in) then ``run`` in a child; it must die by SIGKILL."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        def die(*_, **__):
            os.kill(os.getpid(), signal.SIGKILL)
    """) + textwrap.dedent(setup) + textwrap.dedent(run)
    child = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


CONVERT = """
from anomdiff.atomic import remove_leftovers
from anomdiff.data.convert import convert
convert({src!r}, {out!r}, "mvtec", image_size=16, workers=1, shard_mb=0.001, overwrite={overwrite})
"""

KILL_POINTS = {
    # after the first shard is on disk, mid-conversion
    "mid_conversion": """
        import anomdiff.data.writer as w
        flush = w.DatasetWriter._flush
        def flush_then_die(self, key):
            flush(self, key)
            die()
        w.DatasetWriter._flush = flush_then_die
    """,
    # the new dataset complete, manifest written, not yet moved in
    "before_the_move": """
        import anomdiff.data.writer as w
        w.replace_directory = die
    """,
    # moving in, between the two renames of the fallback path (no atomic exchange)
    "between_renames": """
        import anomdiff.atomic as a
        a._exchange = lambda *_: False
        replace = os.replace
        def replace_then_die(src, dst):
            if str(src).endswith(".tmp") and os.path.basename(dst) == "data":  # the old one is aside now
                die()
            replace(src, dst)
        a.os.replace = replace_then_die
    """,
}


# A new dataset is moved in with one rename: "between_renames" exists only when one is replaced.
@pytest.mark.parametrize("point, overwrite", [(p, o) for p in KILL_POINTS for o in (False, True)
                                              if o or p != "between_renames"])
def test_a_conversion_killed_anywhere_loses_nothing_and_the_rerun_completes(tmp_path, point, overwrite):
    src = mvtec_tree(tmp_path / "src", categories=("bottle", "cable"))
    out = tmp_path / "data"
    if overwrite:
        convert(src, out, "mvtec", image_size=24, workers=1)  # the dataset a rerun replaces
    killed_at(KILL_POINTS[point], CONVERT.format(src=str(src), out=str(out), overwrite=overwrite), tmp_path)
    if point == "between_renames":  # the old dataset is set aside; the next writer puts it back first
        assert not out.exists()
        remove_leftovers(out)
    if overwrite:
        assert read_manifest(out)["image_size"] == 24 and verify(out) == []  # the old dataset, whole
    else:
        assert not out.exists()
    manifest = convert(src, out, "mvtec", image_size=16, workers=1, shard_mb=0.001, overwrite=overwrite)
    assert manifest["total"] == 14 and verify(out) == [] and read_manifest(out)["image_size"] == 16
    assert names(tmp_path) == ["data", "src"]  # the killed run's temporaries are gone


SAVE = """
import torch
from anomdiff.models import build_model
from anomdiff.models.config import ModelConfig, load_preset
torch.manual_seed(1)
build_model(ModelConfig.from_dict({{"method": "knn", "image_size": 32}}, base=load_preset("tiny")), 1).save(
    {out!r}, metadata={{"version": "new"}})
"""


@pytest.mark.parametrize("point", ["before_the_swap", "after_the_swap"])
def test_a_model_export_killed_leaves_the_previous_model_or_the_new_one_whole(tmp_path, point):
    import torch

    from anomdiff.models import build_model, load_model
    from anomdiff.models.config import ModelConfig, load_preset

    out = tmp_path / "model"
    build_model(ModelConfig.from_dict({"method": "knn", "image_size": 32}, base=load_preset("tiny")), 1).save(
        out, metadata={"version": "old"})
    setup = {"before_the_swap": """
        import anomdiff.atomic as a
        a.replace_directory = die
    """, "after_the_swap": """
        import anomdiff.atomic as a
        a.shutil.rmtree = die  # the swap is done; dies deleting the old version
    """}[point]
    killed_at(setup, SAVE.format(out=str(out)), tmp_path)
    expected = "old" if point == "before_the_swap" else "new"
    assert load_model(out).metadata == {"version": expected}
    torch.manual_seed(2)
    build_model(ModelConfig.from_dict({"method": "knn", "image_size": 32}, base=load_preset("tiny")), 1).save(
        out, metadata={"version": "newer"})
    assert load_model(out).metadata == {"version": "newer"} and names(tmp_path) == ["model"]


def test_a_report_killed_while_writing_leaves_no_partial_metrics(tmp_path):
    doc = {"num_images": 2, "mean": {"image_auroc": 0.5}, "per_category": {}}
    setup = """
        import anomdiff.atomic as a
        a.fsync_path = die  # the new metrics.json is written beside its place, not yet renamed in
    """
    run = f"""
        from anomdiff.atomic import write_json_atomic
        write_json_atomic({str(tmp_path / "metrics.json")!r}, {doc!r})
    """
    (tmp_path / "metrics.json").write_text(json.dumps({"previous": True}))
    killed_at(setup, run, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"previous": True}
    leftovers = [p for p in tmp_path.iterdir() if p.name != "metrics.json"]
    from anomdiff.atomic import write_json_atomic

    write_json_atomic(tmp_path / "metrics.json", doc)
    assert json.loads((tmp_path / "metrics.json").read_text()) == doc
    assert [p for p in tmp_path.iterdir() if p.name != "metrics.json"] == [] and len(leftovers) == 1
    assert not os.path.exists(leftovers[0])


FULL_DISK = """
set -u
mount -t tmpfs -o size=256k anomdiff-full {disk}
{anomdiff} data synth {disk}/data {args} > {disk}.log 2>&1
echo "status $?"
ls -A {disk}
mount -o remount,size=64m {disk}
{anomdiff} data synth {disk}/data {args} > {disk}.rerun.log 2>&1
echo "status $?"
ls -A {disk}
"""


def test_a_full_disk_is_one_line_leaves_nothing_and_the_rerun_completes(tmp_path):
    """``data synth`` onto a 256 KB tmpfs (mounted in a user and mount namespace of its own), then the
    same command once the tmpfs has grown."""
    import shutil

    unshare = shutil.which("unshare")
    probe = [unshare, "--user", "--map-root-user", "--mount", "true"] if unshare else None
    if probe is None or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("needs unshare(1) and unprivileged user namespaces to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = FULL_DISK.format(disk=disk, anomdiff=Path(sys.executable).parent / "anomdiff",
                              args="--categories 2 --train-per-category 20 --test-per-category 4 --image-size 64")
    done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)
    first, second = done.stdout.split("status ")[1:]
    error = (tmp_path / "disk.log").read_text().strip()
    assert first.split()[0] == "2" and len(error.splitlines()) == 1, error
    assert error.startswith(f"anomdiff: error: {disk}/data/category=") and "no space left on the device" in error
    assert first.split()[1:] == []  # nothing left on the full disk
    assert second.split() == ["0", "data"], done.stdout + done.stderr


TRAINING_ON_A_FILLING_DISK = """
set -u
mount -t tmpfs -o size=200m anomdiff-full {disk}
( while ! ls {disk}/run/ray/checkpoint_*/train_state.json > /dev/null 2>&1; do sleep 0.1; done
  dd if=/dev/zero of={disk}/filler bs=1M > /dev/null 2>&1 ) &
{train} > {disk}.log 2>&1
echo "status $?"
wait
rm {disk}/filler
{train} > {disk}.rerun.log 2>&1
echo "status $?"
"""


@pytest.mark.slow
def test_a_disk_that_fills_during_training_stops_it_with_one_line_and_the_rerun_resumes(tmp_path):
    """``anomdiff train`` (one worker, ZeRO-2) writing onto a tmpfs that another writer fills once the
    step-2 checkpoint is in: the step-4 checkpoint cannot be written. The job stops with one line,
    the step-2 checkpoint is whole, and the same command, once space is freed, resumes from it,
    passes over the cut-short writes and exports."""
    import shutil

    from anomdiff.data.synthetic import synthesize

    unshare = shutil.which("unshare")
    probe = [unshare, "--user", "--map-root-user", "--mount", "true"] if unshare else None
    if probe is None or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("needs unshare(1) and unprivileged user namespaces to mount a small tmpfs")
    synthesize(tmp_path / "data", 3, seed=1, image_size=32, train_per_category=10, test_per_category=4, workers=1)
    disk = tmp_path / "disk"
    disk.mkdir()
    overrides = [f"data.path={tmp_path / 'data'}", f"output_dir={disk / 'run'}", "model.image_size=32",
                 "model.vae.sample_size=32", "model.unet.sample_size=8", "model.diffusion.ddim_steps=2",
                 "train.batch_size=4", "train.steps=4", "train.checkpoint_every=2", "train.vae_steps=2",
                 "train.validation_images=4", "data.validation_fraction=0.2", "train.num_workers=1",
                 "train.zero.stage=2", "train.max_failures=0",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    train = " ".join([str(Path(sys.executable).parent / "anomdiff"), "train", "--config",
                      str(TESTS.parent / "conf" / "experiment" / "demo.yaml"), *overrides])
    done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c",
                           TRAINING_ON_A_FILLING_DISK.format(disk=disk, train=train)],
                          capture_output=True, text=True, timeout=600)
    first, second = (status.split()[0] for status in done.stdout.split("status ")[1:])
    log = (tmp_path / "disk.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("anomdiff: error:")]
    assert first == "2" and errors == [f"anomdiff: error: {disk / 'run'}: no space left on the device; free some "
                                       "space and run the same command again"], log[-3000:]
    rerun = (tmp_path / "disk.rerun.log").read_text()
    assert second == "0", rerun[-3000:]
    assert "resumed from the step-2 checkpoint" in rerun and "exported the step-4 model" in rerun
