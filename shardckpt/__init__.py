"""shardckpt: distributed sharded checkpoints for PyTorch.

Save with ``save`` (or ``async_save``), restore onto any world size with ``load``, check with
``verify``, inspect with ``read_index``. Every failure is a ``CheckpointError``.
"""

from shardckpt.api import VerifyReport, load, read_index, save, verify
from shardckpt.async_save import SaveHandle, async_save, shutdown
from shardckpt.errors import (
    CheckpointError,
    CheckpointInUseError,
    CheckpointIOError,
    CheckpointNotFoundError,
    CommunicationError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    IndexFormatError,
    MissingKeysError,
    RankFailedError,
    ReplicaMismatchError,
    StateMismatchError,
)
from shardckpt.flatten import PerRank
from shardckpt.manager import CheckpointManager, committed_steps
from shardckpt.options import CompressionOptions
from shardckpt.saving import SaveResult
from shardckpt.training import ModelOptimizerState, ResumableSampler, RNGState, seed_everything

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointIOError",
    "CheckpointInUseError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CommunicationError",
    "CompressionOptions",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "IndexFormatError",
    "MissingKeysError",
    "ModelOptimizerState",
    "PerRank",
    "RNGState",
    "RankFailedError",
    "ReplicaMismatchError",
    "ResumableSampler",
    "SaveHandle",
    "SaveResult",
    "StateMismatchError",
    "VerifyReport",
    "async_save",
    "committed_steps",
    "load",
    "read_index",
    "save",
    "seed_everything",
    "shutdown",
    "verify",
]
