"""Garbage collection under a CheckpointManager root, as a pass of its own.

It runs only on the coordinator, only while this job holds the root's lock and has no save in
flight, and never from a read-only call. So it can never delete a step a save is still writing:
no save of this job is running, no other job may save into the root, and a step directory whose
own lock is held (a direct ``save`` into it) is skipped. Every deletion is best effort: a failure
is logged and leaves garbage, never a damaged committed step.

Everything goes through the root's ``Storage``, so the same pass runs on an object store: there a
step is a key prefix, listed by delimiter, and removing it deletes its index first, then every
object under it (and aborts uploads left open there). An object store has no lock, so there the
guarantee rests on the single-writer assumption (storage/s3.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from shardckpt.errors import CheckpointError
from shardckpt.format.schema import INDEX_NAME
from shardckpt.storage import Storage
from shardckpt.storage.faults import hit

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"step-(\d{8,})")


def step_dirs(root: Storage) -> dict[int, str]:
    """Every ``step-N`` entry under ``root`` (committed or not), by step, as entry names. Reads
    only. A local entry that is a symbolic link is not listed: it is never a step, and never deleted."""
    found = {}
    for name in root.list_dirs(""):
        m = STEP_DIR.fullmatch(name)
        if m:
            found[int(m.group(1))] = name
    return found


def is_committed(root: Storage, name: str) -> bool:
    """Whether the entry ``name`` under ``root`` holds its index (a regular file, locally)."""
    return root.child(name).exists(INDEX_NAME)


def retained(
    steps: list[int], keep_last: int | None, keep_every: int | None, usable: Callable[[int], bool] | None = None,
) -> set[int]:
    """The committed steps that retention keeps: the newest always, then the policy. With
    ``usable``, ``keep_last`` counts only steps that pass it: the steps walked over to find them
    are kept too, so a damaged newer step never costs a loadable older one its place."""
    if keep_last is None and keep_every is None:
        return set(steps)
    keep = set(steps[-1:])
    if keep_last is not None:
        found = 0
        for s in reversed(steps):
            if found == keep_last:
                break
            keep.add(s)
            found += usable is None or usable(s)
    if keep_every is not None:
        keep.update(s for s in steps if s % keep_every == 0)
    return keep


def collect(
    root: Storage, keep_last: int | None, keep_every: int | None, upto: int | None = None,
    usable: Callable[[int], bool] | None = None,
) -> list[int]:
    """Remove torn step directories, then the committed steps retention drops; returns what went.

    Retention applies to the steps up to ``upto``, the step the job saves now (None: no retention,
    only torn steps go). Steps numbered after it are neither counted nor removed: a job that went
    back to an older step has them from before, and whether they are still wanted is the user's
    call. ``usable`` (see ``retained``) tells a loadable step from a damaged one."""
    dirs = step_dirs(root)
    committed = sorted(s for s, name in dirs.items() if is_committed(root, name))
    if upto is None:
        keep = set(committed)
    else:
        later = [s for s in committed if s > upto]
        keep = set(later) | retained([s for s in committed if s <= upto], keep_last, keep_every, usable)
        loadable = [s for s in later if usable is None or usable(s)]
        if loadable:  # a damaged later step is no hazard: a restore skips it
            log.warning(
                "%s holds step(s) %s, numbered after step %d being saved: retention leaves them alone, and a "
                "restore would pick them over this run's steps; remove them if the job went back on purpose",
                root.location, loadable, upto,
            )
    removed = []
    for step, name in sorted(dirs.items()):
        if step in keep:
            continue
        torn = step not in committed
        if remove_step(root, name, "torn" if torn else "retention"):
            removed.append(step)
            log.info("%s %s/%s", "removed torn save" if torn else "retention removed step", root.location, name)
    # A save killed before any of its objects completed leaves only open multipart uploads: no
    # object, so no step above. No save is in flight now and no other job saves here, so every
    # upload still open under the root is such a leftover.
    try:
        aborted = root.abort_uploads()
    except (OSError, CheckpointError) as e:
        log.warning("could not abort the uploads left open under %s: %s", root.location, e)
    else:
        if aborted:
            log.info("aborted %d upload(s) left open under %s by a killed save", aborted, root.location)
    return removed


def remove_step(root: Storage, name: str, point: str) -> bool:
    """Uncommit and delete the step directory ``name``; False (logged) when it is a link, its lock
    is held or a deletion fails."""
    where = f"{root.location}/{name}"
    try:
        step = root.child(name)
    except CheckpointError as e:
        log.warning("not removing %s: %s", where, e)
        return False
    lock = step.lock(f"removing {name}")
    if not lock.try_acquire():
        log.warning("not removing %s: a save into it holds its lock", where)
        return False
    try:
        hit(point)
        # Uncommit first and make that durable: a crash from here on leaves a torn step, which is
        # never listed, instead of an index whose data is half gone.
        step.delete(INDEX_NAME)
        step.fsync_dir("")
        step.delete_tree()
    except (OSError, CheckpointError) as e:
        log.warning("could not remove %s: %s", where, e)
        return False
    finally:
        lock.release()
    return True
