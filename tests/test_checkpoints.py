"""Sealed checkpoints: what a resume and an export accept, what they name and skip."""

import errno
import json

import pytest

from pipelines import checkpoints


def write_checkpoint(folder, step, ranks=2):
    """A checkpoint as Ray Train assembles it: every rank's files in one folder, each rank sealed."""
    for rank in range(ranks):
        staging = folder.parent / f"staging-{folder.name}-{rank}"
        (staging / "ds").mkdir(parents=True)
        (staging / "ds" / f"rank{rank}_states.pt").write_bytes(bytes(range(256)) * (rank + 4))
        if rank == 0:
            (staging / checkpoints.STATE_FILE).write_text(json.dumps({"step": step, "sealed_ranks": ranks}))
        checkpoints.seal(staging, rank)
        for path in staging.rglob("*"):
            if path.is_file():
                target = folder / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
    return folder


def test_a_whole_checkpoint_passes_and_each_kind_of_damage_is_named(tmp_path):
    def fresh(name):
        return write_checkpoint(tmp_path / name, 2)

    assert checkpoints.problem(fresh("whole")) is None
    truncated = fresh("truncated") / "ds" / "rank1_states.pt"
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert checkpoints.problem(truncated.parent.parent) == "ds/rank1_states.pt is 100 bytes, 1280 were written"
    flipped = fresh("flipped") / "ds" / "rank0_states.pt"
    data = bytearray(flipped.read_bytes())
    data[7] ^= 1
    flipped.write_bytes(bytes(data))
    assert checkpoints.problem(flipped.parent.parent) == "ds/rank0_states.pt does not match its checksum"
    lost_rank = fresh("lost_rank")
    (lost_rank / "manifest.rank1.json").unlink()
    assert checkpoints.problem(lost_rank) == "manifest.rank1.json missing or unreadable"
    malformed = fresh("malformed")
    (malformed / "manifest.rank0.json").write_text('{"files": [["ds/rank0_states.pt", 1280]]}')
    assert checkpoints.problem(malformed) == "manifest.rank0.json malformed"
    lost_file = fresh("lost_file")
    (lost_file / "ds" / "rank0_states.pt").unlink()
    assert checkpoints.problem(lost_file) == "ds/rank0_states.pt missing"
    no_state = fresh("no_state")
    (no_state / checkpoints.STATE_FILE).write_text('{"step": 2, "sealed_ra')
    assert checkpoints.problem(no_state).startswith(f"{checkpoints.STATE_FILE} unreadable")


def test_the_resume_falls_back_to_the_newest_whole_checkpoint_and_names_the_damaged(tmp_path):
    run = tmp_path / "ray"
    oldest, middle, latest = (write_checkpoint(run / f"checkpoint_{i}", step) for i, step in enumerate((2, 4, 6)))
    (latest / "ds" / "rank0_states.pt").write_bytes(b"")
    (run / "checkpoint_3_partial").mkdir()  # a write the disk cut short: no state file, not a candidate
    said = []
    assert checkpoints.newest_whole(run, latest, say=said.append) == middle
    assert len(said) == 1 and str(latest) in said[0] and "rank0_states.pt is 0 bytes" in said[0]
    assert (latest / "ds" / "rank0_states.pt").exists()  # left for a person to look at
    (middle / "manifest.rank0.json").unlink()
    assert checkpoints.newest_whole(run, latest, say=said.append) == oldest
    assert checkpoints.newest_whole(run, None, say=said.append) == oldest  # Ray's record of them lost
    (oldest / checkpoints.STATE_FILE).unlink()
    assert checkpoints.newest_whole(run, latest, say=said.append) is None


def test_an_unreadable_ray_record_is_kept_aside_and_a_readable_one_left_alone(tmp_path):
    record = tmp_path / checkpoints.RAY_RECORD
    record.write_text('{"ray_version": "2.60.0"}')
    assert checkpoints.set_aside_unreadable_record(tmp_path) is None and record.exists()
    record.write_text("")  # what a full disk left
    aside = checkpoints.set_aside_unreadable_record(tmp_path, say=lambda line: None)
    assert not record.exists() and aside.read_text() == "" and aside.parent == tmp_path
    assert checkpoints.set_aside_unreadable_record(tmp_path / "never-ran") is None


def test_a_full_disk_and_damaged_checkpoints_reach_the_driver_as_errors_a_person_can_act_on(tmp_path):
    from ray.train import ControllerError, WorkerGroupError

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/ray")
    try:
        try:
            raise full
        except OSError as cause:
            raise RuntimeError("PytorchStreamWriter failed writing file") from cause
    except RuntimeError as wrapped:
        failure = WorkerGroupError("rank 1 failed", {0: ValueError("unrelated"), 1: wrapped})
    found = checkpoints.user_error(failure, tmp_path)
    assert isinstance(found, OSError) and found.errno == errno.ENOSPC and found.filename == "/runs/x/ray"
    damaged = checkpoints.DamagedCheckpoints("no whole checkpoint in /runs/x/ray")
    assert str(checkpoints.user_error(WorkerGroupError("x", {0: damaged}), tmp_path)) == str(damaged)
    assert checkpoints.user_error(WorkerGroupError("x", {0: ValueError("a bug")}), tmp_path) is None
    unnamed = checkpoints.user_error(ControllerError(OSError(errno.ENOSPC, "Error writing bytes")), tmp_path)
    assert unnamed.errno == errno.ENOSPC and unnamed.filename == str(tmp_path)  # Ray's own record's write

    # torch reports a full disk as a failed write: the folder with no space left is named
    assert checkpoints.full_disk(RuntimeError("file write failed"), [tmp_path]) is None
    assert checkpoints.full_disk(full, [tmp_path]) == str(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_the_export_takes_the_best_whole_checkpoint(tmp_path, damage):
    metric = "val_selection"
    run = tmp_path / "ray"
    best, second = write_checkpoint(run / "a", 4), write_checkpoint(run / "b", 2)
    for folder, score in ((best, 0.9), (second, 0.6)):
        state = json.loads((folder / checkpoints.STATE_FILE).read_text())
        (folder / checkpoints.STATE_FILE).write_text(json.dumps({**state, metric: score}))
        checkpoints.seal(folder, 0)  # rank 0 sealed its state file with the score in it
    assert checkpoints.best_whole(run, metric) == best
    shard = best / "ds" / "rank1_states.pt"
    shard.write_bytes(shard.read_bytes()[:-1] if damage == "truncate" else shard.read_bytes()[::-1])
    said = []
    assert checkpoints.best_whole(run, metric, say=said.append) == second and str(best) in said[0]
    (second / checkpoints.STATE_FILE).unlink()
    assert checkpoints.best_whole(run, metric, say=said.append) is None
