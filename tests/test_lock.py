"""One live job per output folder: the lock names its holder, refuses a second job, and is taken
over from a holder that is gone so that a killed job's command resumes."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from anomdiff.data.synthetic import synthesize
from anomdiff.lock import LOCK_FILE, FolderInUseError, hold_folder

HOLD = "import sys, time\nfrom anomdiff.lock import hold_folder\nwith hold_folder(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(600)\n"


@pytest.fixture
def other_job(tmp_path):
    """A live process on this host holding ``tmp_path / 'out'``."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out"), "--the-command"],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_job_is_refused_with_the_holders_process_host_and_command(tmp_path, other_job):
    with pytest.raises(FolderInUseError) as refused:
        with hold_folder(tmp_path / "out"):
            pass
    message = str(refused.value)
    assert f"process {other_job.pid} on {socket.gethostname()}" in message and "--the-command" in message
    assert "\n" not in message


def test_a_killed_holders_lock_is_taken_over_and_released_at_the_end(tmp_path, other_job):
    other_job.kill()
    other_job.wait()
    with hold_folder(tmp_path / "out") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_taken_over_only_once_it_goes_stale(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then", "command": "anomdiff train"}))
    with pytest.raises(FolderInUseError, match="process 1 on elsewhere"):
        with hold_folder(out, stale_s=60):
            pass
    old = time.time() - 120
    os.utime(lock, (old, old))  # its holder stopped refreshing it two minutes ago
    with hold_folder(out, stale_s=60):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()


def test_the_holder_refreshes_its_lock_and_may_take_it_again_inside(tmp_path):
    with hold_folder(tmp_path / "out", refresh_s=0.05) as lock:
        old = time.time() - 100
        os.utime(lock, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 5  # touched again by the holder
        with hold_folder(tmp_path / "out"):  # a job calling another job on the same folder
            pass
        assert lock.exists()  # still held by the outer block
    assert not lock.exists()


def test_the_lock_is_released_when_the_job_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with hold_folder(tmp_path / "out"):
            raise RuntimeError("the job failed")
    with hold_folder(tmp_path / "out"):
        pass


def test_a_double_submitted_training_is_refused_before_ray_with_one_line(tmp_path, other_job):
    data = tmp_path / "data"
    synthesize(data, 2, seed=0, image_size=32, train_per_category=4, test_per_category=2, workers=1)
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--config", "conf/experiment/demo.yaml",
                           f"data.path={data}", f"output_dir={tmp_path / 'out'}", "model.image_size=32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("anomdiff: error:") and f"process {other_job.pid}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Started a local Ray" not in done.stdout + done.stderr


def test_a_prediction_into_a_held_folder_is_refused(tmp_path, other_job):
    from PIL import Image
    from samples import noise_bank_knn

    noise_bank_knn(image_size=32).save(tmp_path / "model", metadata={"categories": ["a"], "threshold": 1.0})
    Image.new("RGB", (32, 32), (90, 120, 60)).save(tmp_path / "part.png")
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", str(tmp_path / "model"),
                           str(tmp_path / "part.png"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and f"process {other_job.pid}" in done.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_a_lock_naming_this_process_that_it_does_not_hold_is_a_dead_predecessors(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "started": "before the restart", "command": "anomdiff train"}))
    with hold_folder(out) as lock:
        assert json.loads(lock.read_text())["started"] != "before the restart"
    assert not lock.exists()


def test_of_two_jobs_taking_over_a_dead_lock_the_second_leaves_the_firsts_lock_in_place(tmp_path):
    from anomdiff.lock import _take_over

    lock = tmp_path / LOCK_FILE
    dead = {"pid": 999999, "host": socket.gethostname(), "started": "then", "command": "killed"}
    first = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "command": "first"}
    lock.write_text(json.dumps(first))  # the first job has already taken over and holds it
    assert _take_over(lock, dead) is False  # the second judged the dead one: it must not remove the first's
    assert json.loads(lock.read_text()) == first
    lock.write_text(json.dumps(dead))
    assert _take_over(lock, dead) is True and not lock.exists()
