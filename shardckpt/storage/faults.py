"""Fault injection for tests: make the Nth pass through a named point fail on a chosen rank, so
every phase of a save can be broken on every rank, by an exception or by SIGKILL.

Points (each is one call site; docs/reliability.md lists where each one sits):

    flatten, stage, write (a data-file append), fsync (a data file), data_dir_fsync,
    gather (any collective of shardckpt), written (a rank's write reported to every rank, before
    the commit), index_write, rename (publishing index.json),
    dir_fsync (of the step directory, after the rename), cleanup (stale data files after a commit),
    retention and torn (the manager's garbage collection), delete, read

A spec is ``POINT:N:ACTION[@RANK]``, several joined by commas. ACTION is ``eio`` or ``enospc``
(an ``OSError`` with that errno), ``exit`` (``SystemExit``, as a preemption handler would) or
``kill`` (SIGKILL of this process). Without ``@RANK`` it applies on every rank; the rank is the
``RANK`` environment variable, as torchrun sets it. The spec comes from ``SHARDCKPT_FAULT`` or from
``configure`` (in-process tests). With no spec, ``hit`` costs one comparison.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from dataclasses import dataclass

from shardckpt.errors import StateMismatchError
from shardckpt.options import fault_spec

POINTS = (
    "flatten", "vote", "stage", "write", "fsync", "data_dir_fsync", "gather", "written", "index_write", "rename",
    "dir_fsync",
    "cleanup", "retention", "torn", "delete", "read",
)
ACTIONS = ("eio", "enospc", "exit", "kill")


@dataclass(frozen=True)
class Fault:
    point: str
    nth: int
    action: str


_lock = threading.Lock()
_faults: dict[str, Fault] | None = None  # None until the environment is read
_counts: dict[str, int] = {}


def parse(spec: str, rank: str) -> dict[str, Fault]:
    """The faults of ``spec`` that apply on ``rank``, by point."""
    faults: dict[str, Fault] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        body, _, only = part.partition("@")
        fields = body.split(":")
        if len(fields) != 3 or fields[0] not in POINTS or fields[2] not in ACTIONS or not fields[1].isdigit():
            raise StateMismatchError(
                f"bad fault spec {part!r}: expected POINT:N:ACTION[@RANK] with POINT in {POINTS}, N >= 1, "
                f"ACTION in {ACTIONS}"
            )
        if not only or only == rank:
            faults[fields[0]] = Fault(fields[0], int(fields[1]), fields[2])
    return faults


def configure(spec: str) -> None:
    """Replace the faults of this process (and restart the counts); ``""`` turns them off."""
    global _faults
    with _lock:
        _faults = parse(spec, fault_spec()[1])
        _counts.clear()


def hit(point: str) -> None:
    """Count one pass through ``point``; fail here if a fault names this pass."""
    global _faults
    if _faults is None:
        with _lock:
            if _faults is None:
                _faults = parse(*fault_spec())
    if not _faults or point not in _faults:
        return
    with _lock:
        n = _counts[point] = _counts.get(point, 0) + 1
    fault = _faults[point]
    if n != fault.nth:
        return
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "exit":
        raise SystemExit(f"injected exit at {point} #{n}")
    code = errno.ENOSPC if fault.action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at {point} #{n})")
