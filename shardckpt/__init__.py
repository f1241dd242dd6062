"""shardckpt: distributed sharded checkpoints for PyTorch.

Save with ``save`` (or ``async_save``), restore onto any world size with ``load``, check with
``verify``, inspect with ``read_index``, read without a target state with ``load_all`` (or
``CheckpointReader``, one tensor at a time), export to Hugging Face safetensors with
``export_safetensors``. Every failure is a ``CheckpointError``.
"""

from shardckpt.api import ByRank, CheckpointReader, VerifyReport, load, load_all, read_index, save, verify
from shardckpt.async_save import SaveHandle, async_save, shutdown
from shardckpt.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointInUseError,
    CheckpointIOError,
    CheckpointNotFoundError,
    CommunicationError,
    CorruptCheckpointError,
    ExportError,
    IncompleteCheckpointError,
    IndexFormatError,
    MissingKeysError,
    RankFailedError,
    ReplicaMismatchError,
    StateMismatchError,
    StorageAccessError,
    UnsupportedStorageError,
)
from shardckpt.flatten import PerRank
from shardckpt.interop.safetensors import ExportResult, export_safetensors
from shardckpt.manager import CheckpointManager, committed_steps
from shardckpt.options import CompressionOptions
from shardckpt.saving import SaveResult
from shardckpt.storage.s3 import S3Options
from shardckpt.training import ModelOptimizerState, ResumableSampler, RNGState, seed_everything

__version__ = "0.1.0"

__all__ = [
    "BucketNotFoundError",
    "ByRank",
    "CheckpointError",
    "CheckpointIOError",
    "CheckpointInUseError",
    "CheckpointManager",
    "CheckpointReader",
    "CheckpointNotFoundError",
    "CommunicationError",
    "CompressionOptions",
    "CorruptCheckpointError",
    "ExportError",
    "ExportResult",
    "IncompleteCheckpointError",
    "IndexFormatError",
    "MissingKeysError",
    "ModelOptimizerState",
    "PerRank",
    "RNGState",
    "RankFailedError",
    "ReplicaMismatchError",
    "S3Options",
    "ResumableSampler",
    "SaveHandle",
    "SaveResult",
    "StateMismatchError",
    "StorageAccessError",
    "UnsupportedStorageError",
    "VerifyReport",
    "async_save",
    "committed_steps",
    "export_safetensors",
    "load",
    "load_all",
    "read_index",
    "save",
    "seed_everything",
    "shutdown",
    "verify",
]
