"""Atomic writes: build beside the destination, then rename over it; nothing half-written is ever seen.

Files and folders are fsynced before they are renamed in, and the folder holding them after, so a
power cut leaves the old version or the new one. Temporaries are named after the process that owns
them (``.NAME.PID.<random>.tmp``, ``.NAME.old-PID``), so the next writer of the same destination can
tell a crashed writer's leftovers from a running one's and clean them up. New files and folders get
the permissions the umask allows (``tempfile`` alone would make them private to their owner).
"""

from __future__ import annotations

import csv
import ctypes
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)\.[^.]+\.tmp|old-(?P<old_pid>\d+))$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, deepest first, then ``root``."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftovers(dest: str | Path) -> list[Path]:
    """Remove the temporaries that crashed writers of ``dest`` left beside it (their process is gone);
    a retired old version whose replacement never arrived is put back first. Returns what was removed."""
    dest = Path(dest)
    removed = []
    if not dest.parent.is_dir():
        return removed
    for entry in sorted(dest.parent.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if not match or match["name"] != dest.name or process_alive(int(match["pid"] or match["old_pid"])):
            continue
        if match["old_pid"] and not dest.exists() and not dest.is_symlink():
            os.replace(entry, dest)  # killed between the two renames: the old version is the current one
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def staging_directory(dest: str | Path) -> Path:
    """A new empty folder beside ``dest`` to build its next version in (crashed writers' leftovers
    are removed first)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    path.chmod(0o777 & ~_umask())
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the C library
    or the filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def replace_directory(staging: Path, dest: str | Path) -> Path:
    """Move the complete folder ``staging`` onto ``dest``, fsynced. An existing folder is swapped
    with the new one in one step where Linux allows (so a reader finds the old version or the new
    one, never neither), then deleted; elsewhere it is set aside, the new one renamed in and the old
    one deleted, and a crash between those renames leaves the old version aside for
    :func:`remove_leftovers` (every staging call) to put back."""
    dest = Path(dest)
    fsync_tree(staging)
    if dest.is_dir() and not dest.is_symlink() and _exchange(staging, dest):
        fsync_path(dest.parent)
        shutil.rmtree(staging)  # the old version now
        return dest
    if dest.exists() or dest.is_symlink():
        retired = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, retired)
        try:
            os.replace(staging, dest)
        except BaseException:
            os.replace(retired, dest)
            raise
        fsync_path(dest.parent)
        if retired.is_dir() and not retired.is_symlink():
            shutil.rmtree(retired)
        else:
            retired.unlink()
    else:
        os.replace(staging, dest)
        fsync_path(dest.parent)
    return dest


@contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``dest`` (:func:`replace_directory`), on any
    failure it is removed and ``dest`` is untouched."""
    staging = staging_directory(dest)
    try:
        yield staging
        replace_directory(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (crashed writers' leftovers removed first); on success it
    is fsynced and replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        tmp_path.chmod(0o666 & ~_umask())
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv_atomic(path: str | Path, rows: list[dict], columns: list[str], extras: str = "raise") -> Path:
    """Write ``rows`` as CSV with a header of ``columns``; ``extras="ignore"`` leaves out other keys
    (``csv.DictWriter``'s ``extrasaction``), by default they are an error."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction=extras, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, text.getvalue())


def write_json_atomic(path: str | Path, doc: object) -> Path:
    """Write ``doc`` as indented JSON; NaN or inf in it raise ``ValueError`` (JSON has neither)."""
    return write_text_atomic(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
