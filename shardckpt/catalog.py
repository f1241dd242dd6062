"""What exists, read without torch: a checkpoint's index, a manager root's committed steps.

These only read JSON and list directories, so the commands that need nothing more
(``shardckpt ls``, ``shardckpt inspect``) start in a fraction of a second: nothing here imports
torch, directly or through the modules it imports (tests/unit/test_cli_fast_start.py checks it).
``shardckpt.read_index`` and ``shardckpt.committed_steps`` are these functions.
"""

from __future__ import annotations

import os

from shardckpt import cleanup
from shardckpt.commit import read_committed_index
from shardckpt.format.schema import CheckpointIndex
from shardckpt.storage import Storage, open_storage
from shardckpt.storage.s3 import S3Options

PathLike = str | os.PathLike[str]


def read_index(path: PathLike, *, s3: S3Options | None = None) -> CheckpointIndex:
    """The checkpoint's metadata (tensors, blocks, values, files) with no torch.distributed needed.
    Values are in their stored typed-JSON form; ``shardckpt.format.values.decode_value`` decodes them.

    Example::

        index = shardckpt.read_index("ckpt/step-100")
        [(t.key, t.dtype, t.shape) for t in index.tensors]
    """
    storage = open_storage(path, s3=s3)
    try:
        return read_committed_index(storage)
    finally:
        storage.close()


def committed_steps(root: PathLike, *, s3: S3Options | None = None) -> list[int]:
    """The committed steps under a manager root (a directory or URL), ascending. Reads only; no
    manager needed."""
    storage = open_storage(root, s3=s3)
    try:
        return committed_in(storage)
    finally:
        storage.close()


def committed_in(root: Storage) -> list[int]:
    """``committed_steps`` for a root that is already open."""
    return sorted(s for s, name in cleanup.step_dirs(root).items() if cleanup.is_committed(root, name))
