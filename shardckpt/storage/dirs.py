"""Durable directories: fsync a directory's entries, and create directories whose own entries
survive a power loss. Shared by the local storage and the lock, which both create directories."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def sync_directory(open_dir: Callable[[], int]) -> None:
    """fsync the directory that ``open_dir`` opens (it returns the descriptor, closed here). A
    filesystem that cannot fsync directories (EINVAL) is let be; other errors are raised."""
    fd = open_dir()
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create ``path`` and its missing ancestors. The entries of the ancestors created here are
    made durable (each parent fsynced): a root made by its first save (ckpt/run7/step-1 with no
    ckpt/run7 yet) would otherwise hang off a parent whose new entry a power loss can undo, taking
    every step with it. ``path``'s own entry is left to the commit (``fsync_parent``), which
    fsyncs it anyway."""
    created = []
    above = path.parent
    while not os.path.lexists(above) and above != above.parent:
        created.append(above)
        above = above.parent
    path.mkdir(parents=True, exist_ok=True)
    for made in reversed(created):
        sync_directory(partial(os.open, made.parent, DIR_FLAGS))
