"""One live job per output folder: a lock file that names its holder.

A job that writes into a folder (training's ``output_dir``, an evaluation's report folder, a
search, a sweep, a prediction) holds ``FOLDER/.anomdiff.lock`` while it runs. The file is created
with ``O_CREAT | O_EXCL``, which is atomic on local filesystems and on NFS v3+ and the usual cluster
volumes, and holds the holder's process id, host, process start time, start date and command. A
second job aimed at the folder is refused with one line naming the holder.

A lock whose holder is gone is taken over, so that the same command resumes a killed job:
- on the holder's own host, when its process no longer exists (or the id now belongs to a process
  started at another time);
- from another host, whose processes this one cannot see, when the holder has not refreshed the
  file for ``stale_s`` seconds: a holder touches its lock every ``refresh_s`` seconds from a
  daemon thread, so a lock goes stale only when its holder's process (or host) has stopped. This
  relies on the volume's clocks agreeing to within ``stale_s - refresh_s`` (NTP).
The same process may take the lock of a folder it already holds (a job calling another job); a
lock that names this process but that this process does not hold is a dead predecessor's (a
restarted container reuses its host name and often its process id) and is taken over. Of two jobs
taking over the same dead lock, one gets it: a job that moved aside a lock other than the dead
one it judged puts it back.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from anomdiff.atomic import process_alive

LOCK_FILE = ".anomdiff.lock"
REFRESH_S = 30.0
STALE_S = 180.0


class FolderInUseError(ValueError):
    """Another live job holds the output folder."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot), or None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _start_time(os.getpid()),
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv)}


def _alive_here(holder: dict) -> bool:
    try:
        pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if pid <= 0 or not process_alive(pid):
        return False
    recorded, current = holder.get("process_start"), _start_time(pid)
    return recorded is None or current is None or recorded == current  # a reused id is another process


def _is_gone(path: Path, holder: dict, stale_s: float) -> bool:
    if holder.get("host") == socket.gethostname():
        return not _alive_here(holder)
    try:
        return time.time() - path.stat().st_mtime > stale_s
    except FileNotFoundError:
        return True


def _read(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # a torn or foreign file: judged by its age alone
    return doc if isinstance(doc, dict) else {}


def _describe(holder: dict) -> str:
    if not isinstance(holder, dict):
        return "an unreadable holder"
    return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')} "
            f"({holder.get('command', '?')!r})")


def _create(path: Path, holder: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, dead: dict) -> bool:
    """Move the dead holder's lock aside; ``False`` when what was moved is not that lock (another job
    took it over first and holds it now: it is put back)."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False
    moved = _read(aside)
    if moved != dead:
        try:
            os.link(aside, path)  # back where it was, unless a third job has created one meanwhile
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)
    return moved == dead


_HELD: dict[Path, int] = {}  # the folders this process holds, and how many blocks hold each


@contextmanager
def hold_folder(folder: str | Path, refresh_s: float = REFRESH_S, stale_s: float = STALE_S) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (the folder is created); refused with
    :class:`FolderInUseError` while another live job holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILE).resolve()
    if path in _HELD:  # this process holds it already (a job calling another job): the outer block releases it
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    me = _holder()
    for _ in range(5):
        if _create(path, me):
            break
        holder = _read(path)
        if holder is None:
            continue  # released meanwhile: try again
        # A lock naming this process that this process does not hold is a dead predecessor's (a
        # restarted container reuses the host name and often the process id).
        own_id = holder.get("pid") == me["pid"] and holder.get("host") == me["host"]
        if not own_id and not _is_gone(path, holder, stale_s):
            raise FolderInUseError(f"{folder} is in use by another job: {_describe(holder)}. Wait for it to end or "
                                   f"stop it; if it is gone (another host, not seen for {stale_s:.0f} s), remove "
                                   f"{path}")
        print(f"[lock] taking over {path} from {_describe(holder)}, which is no longer running", flush=True)
        _take_over(path, holder)
    else:
        raise FolderInUseError(f"{folder}: could not take its lock {path}; another job is starting there")
    _HELD[path] = 1
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(refresh_s):
            try:
                os.utime(path)
            except OSError as exc:  # a passing error of the volume: try again at the next beat
                print(f"[lock] could not refresh {path}: {exc}", flush=True)

    beat = threading.Thread(target=refresh, name="anomdiff-lock", daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        del _HELD[path]
        held = _read(path) or {}
        if held.get("pid") == me["pid"] and held.get("host") == me["host"]:
            path.unlink(missing_ok=True)
