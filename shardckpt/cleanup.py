"""Garbage collection under a CheckpointManager root, as a pass of its own.

It runs only on the coordinator, only while this job holds the root's lock and has no save in
flight, and never from a read-only call. So it can never delete a step a save is still writing:
no save of this job is running, no other job may save into the root, and a step directory whose
own lock is held (a direct ``save`` into it) is skipped. Every deletion is best effort: a failure
is logged and leaves garbage, never a damaged committed step.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from shardckpt.errors import CheckpointError
from shardckpt.format.schema import INDEX_NAME
from shardckpt.storage.faults import hit
from shardckpt.storage.lock import PathLock

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"step-(\d{8,})")


def step_dirs(root: Path) -> dict[int, Path]:
    """Every ``step-N`` entry under ``root`` (committed or not), by step. Reads only."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CheckpointError(f"cannot list checkpoint root {root}: {e.strerror}") from e
    found = {}
    for entry in entries:
        m = STEP_DIR.fullmatch(entry.name)
        if m:
            found[int(m.group(1))] = Path(entry.path)
    return found


def is_committed(path: Path) -> bool:
    """A real step directory (no symbolic link) holding a regular index file."""
    return not path.is_symlink() and path.is_dir() and (path / INDEX_NAME).is_file() and not (path / INDEX_NAME).is_symlink()


def retained(steps: list[int], keep_last: int | None, keep_every: int | None) -> set[int]:
    """The committed steps that retention keeps: the newest always, then the policy."""
    if keep_last is None and keep_every is None:
        return set(steps)
    keep = set(steps[-1:])
    if keep_last is not None:
        keep.update(steps[-keep_last:])
    if keep_every is not None:
        keep.update(s for s in steps if s % keep_every == 0)
    return keep


def collect(root: Path, keep_last: int | None, keep_every: int | None) -> list[int]:
    """Remove torn step directories, then the committed steps retention drops; returns what went."""
    dirs = step_dirs(root)
    committed = sorted(s for s, p in dirs.items() if is_committed(p))
    keep = retained(committed, keep_last, keep_every)
    removed = []
    for step, path in sorted(dirs.items()):
        if step in keep:
            continue
        torn = step not in committed
        if path.is_symlink():
            log.warning("not removing %s: a symbolic link; nothing outside the root is deleted", path)
            continue
        if _remove_step(path, "torn" if torn else "retention"):
            removed.append(step)
            log.info("%s %s", "removed torn save" if torn else "retention removed step", path)
    return removed


def _remove_step(path: Path, point: str) -> bool:
    lock = PathLock(path, f"removing {path.name}")
    if not lock.try_acquire():
        log.warning("not removing %s: a save into it holds its lock", path)
        return False
    try:
        hit(point)
        # Uncommit first and make that durable: a crash from here on leaves a torn directory,
        # which is never listed, instead of an index whose data is half gone.
        (path / INDEX_NAME).unlink(missing_ok=True)
        _fsync(path)
        shutil.rmtree(path)
        _fsync(path.parent)
    except (OSError, CheckpointError) as e:
        log.warning("could not remove %s: %s", path, e)
        return False
    finally:
        lock.release()
    return True


def _fsync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

