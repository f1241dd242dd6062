"""One writer per checkpoint path or manager root, enforced with an advisory lock file.

Two jobs saving into one place would each remove the other's data files as stale. The lock is an
``flock`` on a hidden file, held by the coordinator of the job that saves: the kernel drops it when
the process dies, so a crashed job never leaves a root locked, and a restarted job takes it again.
The file holds who locked it, for the error message of whoever is refused.

flock works across processes on one host and on network filesystems that implement it (NFSv4,
most cluster filesystems with locking enabled); where a filesystem ignores it, the check passes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path

from shardckpt.errors import CheckpointInUseError, CheckpointIOError
from shardckpt.storage.dirs import make_dirs

LOCK_NAME = ".shardckpt.lock"


class PathLock:
    """An exclusive lock on ``directory``, taken with ``acquire`` and dropped with ``release``."""

    def __init__(self, directory: Path, purpose: str) -> None:
        self.path = directory / LOCK_NAME
        self.purpose = purpose
        self._fd = -1
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        """Take the lock or raise ``CheckpointInUseError`` naming its holder; never waits."""
        if self.held:
            return
        try:
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise CheckpointIOError(f"cannot create lock file {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise CheckpointInUseError(
                f"{self.path.parent} is being saved to by another job or manager ({holder}); one job may save "
                "into a path or root at a time. Use another directory, or stop the other job"
            ) from None
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "for": self.purpose, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        # A lock whose owner is dropped without release() (a manager never closed, after an
        # exception) lets go when it is collected, not only when the process exits.
        self._finalizer = weakref.finalize(self, os.close, fd)

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; False when somebody does."""
        try:
            self.acquire()
        except CheckpointInUseError:
            return False
        return True

    def release(self) -> None:
        if self.held:
            fd, self._fd = self._fd, -1
            if self._finalizer is not None:
                self._finalizer.detach()
            os.close(fd)  # closing drops the flock


def _read_holder(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {owner['pid']} on {owner['host']}, {owner['for']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
