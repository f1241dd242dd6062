"""The on-disk format: schema, index encoding and validation, file names. See docs/format.md."""

from shardckpt.format.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    BlockEntry,
    CheckpointIndex,
    FileEntry,
    TensorEntry,
    ValueEntry,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "BlockEntry",
    "CheckpointIndex",
    "FileEntry",
    "TensorEntry",
    "ValueEntry",
]
