"""shardckpt: distributed sharded checkpoints for PyTorch.

Save with ``save`` (or ``async_save``), restore onto any world size with ``load``, check with
``verify``, inspect with ``read_index``, read without a target state with ``load_all`` (or
``CheckpointReader``, one tensor at a time), export to Hugging Face safetensors with
``export_safetensors``, import them with ``load_safetensors`` (re-sharded, into a model or state)
or ``read_safetensors`` (plain tensors). Every failure is a ``CheckpointError``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

# The errors are torch-free and cheap: imported eagerly, so ``except shardckpt.CheckpointError``
# costs nothing.
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

if TYPE_CHECKING:  # what mypy and IDEs see; at run time __getattr__ below imports on first use
    from shardckpt.api import ByRank, CheckpointReader, VerifyReport, load, load_all, save, verify
    from shardckpt.async_save import SaveHandle, async_save, shutdown
    from shardckpt.catalog import committed_steps, read_index
    from shardckpt.flatten import PerRank
    from shardckpt.interop.safetensors import ExportResult, export_safetensors
    from shardckpt.interop.safetensors_import import ImportResult, load_safetensors, read_safetensors
    from shardckpt.manager import CheckpointManager, RestoreReport
    from shardckpt.memtier import MemoryRestore, MemoryTier, memory_restore, memory_save
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
    "ImportResult",
    "IncompleteCheckpointError",
    "IndexFormatError",
    "MemoryRestore",
    "MemoryTier",
    "MissingKeysError",
    "ModelOptimizerState",
    "PerRank",
    "RNGState",
    "RankFailedError",
    "ReplicaMismatchError",
    "S3Options",
    "ResumableSampler",
    "RestoreReport",
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
    "load_safetensors",
    "memory_restore",
    "memory_save",
    "read_index",
    "read_safetensors",
    "save",
    "seed_everything",
    "shutdown",
    "verify",
]

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# ``import shardckpt`` (and ``shardckpt ls``/``inspect``, which only read JSON) does not import
# torch and torch.distributed.tensor: seconds on a loaded machine. Names that need torch import
# it when first touched.
_HOMES: dict[str, str] = {
    "ByRank": "shardckpt.api",
    "CheckpointReader": "shardckpt.api",
    "VerifyReport": "shardckpt.api",
    "load": "shardckpt.api",
    "load_all": "shardckpt.api",
    "save": "shardckpt.api",
    "verify": "shardckpt.api",
    "SaveHandle": "shardckpt.async_save",
    "async_save": "shardckpt.async_save",
    "shutdown": "shardckpt.async_save",
    "committed_steps": "shardckpt.catalog",
    "read_index": "shardckpt.catalog",
    "PerRank": "shardckpt.flatten",
    "ExportResult": "shardckpt.interop.safetensors",
    "export_safetensors": "shardckpt.interop.safetensors",
    "ImportResult": "shardckpt.interop.safetensors_import",
    "load_safetensors": "shardckpt.interop.safetensors_import",
    "read_safetensors": "shardckpt.interop.safetensors_import",
    "CheckpointManager": "shardckpt.manager",
    "RestoreReport": "shardckpt.manager",
    "MemoryRestore": "shardckpt.memtier",
    "MemoryTier": "shardckpt.memtier",
    "memory_restore": "shardckpt.memtier",
    "memory_save": "shardckpt.memtier",
    "CompressionOptions": "shardckpt.options",
    "SaveResult": "shardckpt.saving",
    "S3Options": "shardckpt.storage.s3",
    "ModelOptimizerState": "shardckpt.training",
    "ResumableSampler": "shardckpt.training",
    "RNGState": "shardckpt.training",
    "seed_everything": "shardckpt.training",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'shardckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``shardckpt.async_save`` binds the
    module on the package under the name of the public function ``async_save``; keep the function
    there, as the eager ``from shardckpt.async_save import async_save`` used to."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

