"""shardckpt: distributed sharded checkpoints for PyTorch.

Save with ``save`` (or ``async_save``), restore onto any world size with ``load``, check with
``verify``, inspect with ``read_index``. Every failure is a ``CheckpointError``.
"""

from shardckpt.api import VerifyReport, load, read_index, save, verify
from shardckpt.async_save import SaveHandle, async_save, shutdown
from shardckpt.errors import (
    CheckpointError,
    CheckpointIOError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    IndexFormatError,
    MissingKeysError,
    RankFailedError,
    ReplicaMismatchError,
    StateMismatchError,
)
from shardckpt.flatten import PerRank
from shardckpt.options import CompressionOptions
from shardckpt.saving import SaveResult

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "CompressionOptions",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "IndexFormatError",
    "MissingKeysError",
    "PerRank",
    "RankFailedError",
    "ReplicaMismatchError",
    "SaveHandle",
    "SaveResult",
    "StateMismatchError",
    "VerifyReport",
    "async_save",
    "load",
    "read_index",
    "save",
    "shutdown",
    "verify",
]
