"""Checkpoints that can be trusted on resume: every rank seals the files it wrote with a manifest
(size and CRC-32 per file), and a resume or an export checks the seals before loading anything.

A damaged latest checkpoint (truncated by a full disk, a bit flipped on the volume, a rank's files
missing) is named and skipped: the resume falls back to the newest whole one beside it, and the
export to the best whole one. Nothing is deleted: a damaged folder stays where it is for a person
to look at. A full disk while a checkpoint is written stops the job with one line; the previous
checkpoint is whole because Ray Train writes each one into a folder of its own."""

from __future__ import annotations

import errno
import json
import shutil
import time
import zlib
from pathlib import Path

from anomdiff.atomic import write_json_atomic

STATE_FILE = "train_state.json"  # rank 0's: the step, its validation metrics and how many ranks sealed
MANIFEST = "manifest.rank{rank}.json"
_CHUNK = 1 << 22


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def seal(directory: str | Path, rank: int) -> None:
    """Write this rank's manifest of every file it put in ``directory`` (its own staging folder)."""
    root = Path(directory)
    files = {str(p.relative_to(root)): [p.stat().st_size, _crc32(p)]
             for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("manifest.rank")}
    write_json_atomic(root / MANIFEST.format(rank=rank), {"files": files})


def problem(directory: str | Path) -> str | None:
    """Why the checkpoint in ``directory`` cannot be resumed from, or ``None`` when it is whole.
    A checkpoint written before manifests existed is checked for its state file only."""
    root = Path(directory)
    try:
        state = json.loads((root / STATE_FILE).read_text())
        ranks = int(state.get("sealed_ranks", 0))
    except (OSError, ValueError, AttributeError) as exc:
        return f"{STATE_FILE} unreadable ({type(exc).__name__})"
    for rank in range(ranks):
        manifest = root / MANIFEST.format(rank=rank)
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{manifest.name} missing or unreadable"
        try:
            entries = [(name, int(size), int(crc)) for name, (size, crc) in files.items()]
        except (AttributeError, TypeError, ValueError):
            return f"{manifest.name} malformed"
        for name, size, crc in entries:
            path = root / name
            if not path.is_file():
                return f"{name} missing"
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes, {size} were written"
            if _crc32(path) != crc:
                return f"{name} does not match its checksum"
    return None


def step_of(directory: str | Path) -> int:
    return int(json.loads((Path(directory) / STATE_FILE).read_text())["step"])


def _saved_steps(folders: list[Path]) -> dict[Path, int]:
    steps = {}
    for folder in folders:
        try:
            steps[folder] = step_of(folder)
        except (OSError, ValueError, KeyError, TypeError):
            steps[folder] = -1
    return steps


def saved_in(run: str | Path) -> list[Path]:
    """The checkpoint folders of a Ray Train run folder (any with a state file), newest step first."""
    run = Path(run)
    found = [p for p in run.iterdir() if (p / STATE_FILE).is_file()] if run.is_dir() else []
    steps = _saved_steps(found)
    return sorted(found, key=lambda p: (steps[p], p.name), reverse=True)


def newest_whole(run: str | Path, latest: str | Path | None = None, say=print) -> Path | None:
    """The checkpoint to resume from: ``latest`` (Ray Train's) when whole, else the newest whole
    checkpoint in the ``run`` folder (Ray Train keeps each in a folder of its own), which is also
    the answer when Ray's record of them was lost. Each damaged one is named through ``say``;
    ``None`` when none is whole."""
    latest = Path(latest) if latest is not None else None
    for candidate in [*([latest] if latest else []), *(p for p in saved_in(run) if p != latest)]:
        why = problem(candidate)
        if why is None:
            return candidate
        say(f"[train] checkpoint {candidate} is damaged ({why}); it is left in place and not used")
    return None


def best_whole(run: str | Path, metric: str, say=print) -> Path | None:
    """The whole checkpoint of ``run`` with the highest ``metric`` in its state file (the export's
    choice): checked best first, so only damaged ones (named through ``say``) cost a second look."""
    def score(folder: Path) -> float:
        try:
            return float(json.loads((folder / STATE_FILE).read_text()).get(metric, float("-inf")))
        except (OSError, ValueError, TypeError, AttributeError):
            return float("-inf")

    for folder in sorted(saved_in(run), key=score, reverse=True):
        why = problem(folder)
        if why is None:
            return folder
        say(f"[train] not exporting checkpoint {folder}: damaged ({why})")
    return None


RAY_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints


def set_aside_unreadable_record(run: str | Path, say=print) -> Path | None:
    """Ray Train rewrites its record of a run's checkpoints in place; a full disk can leave it empty,
    and Ray then refuses to resume at all. An unreadable record is renamed (kept, not deleted), so
    Ray starts a fresh record and the resume finds the newest whole checkpoint by itself."""
    record = Path(run) / RAY_RECORD
    try:
        json.loads(record.read_text())
        return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        aside = record.with_name(f"{RAY_RECORD}.unreadable-{int(time.time())}")
        record.rename(aside)
        say(f"[train] Ray's record of the checkpoints, {record}, was unreadable (a full disk?): kept as "
            f"{aside.name}; resuming from the newest whole checkpoint in {run}")
        return aside


class DamagedCheckpoints(ValueError):
    """No whole checkpoint to resume from; the message says which folder to move aside."""


def full_disk(exc: BaseException, folders: list[str | Path]) -> str | None:
    """Where a failed write ran out of space: the fullest of ``folders`` when ``exc`` (or anything it
    was raised from) is a full disk or quota, or when one of them has under 1 MiB left (torch
    reports a full disk as a failed write only); ``None`` otherwise."""
    free = {}
    for folder in folders:
        try:
            free[str(folder)] = shutil.disk_usage(folder).free
        except OSError:
            continue
    seen, out_of_space = exc, False
    while seen is not None and not out_of_space:
        out_of_space = isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT)
        seen = seen.__cause__ or seen.__context__
    if free and (out_of_space or min(free.values()) < (1 << 20)):
        return min(free, key=free.get)
    return None


def user_error(exc: BaseException, run: str | Path) -> BaseException | None:
    """The error a person can act on inside a failed Ray Train run (a full disk, damaged
    checkpoints), found through Ray's wrappers: its workers' and controller's failures and their
    causes. A full disk that names no file is placed at ``run``."""
    pending, seen = [exc], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, DamagedCheckpoints):
            return DamagedCheckpoints(str(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return OSError(error.errno, error.strerror, error.filename or str(run))
        pending += [error.__cause__, error.__context__, getattr(error, "cause", None),
                    getattr(error, "controller_failure", None)]
        pending += list(getattr(error, "worker_failures", {}).values())
    return None
