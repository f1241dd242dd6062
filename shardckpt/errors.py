"""The exception hierarchy. Every failure a user can cause or meet is a ``CheckpointError``.

Messages name the checkpoint path, the tensor key and the rank where they are known, so that a
failure in a 64-rank job points at the one file or key that is wrong.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base of every error for a bad or missing checkpoint, a mismatching state or failed I/O."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint at the path (missing or empty directory, no index)."""


class IncompleteCheckpointError(CheckpointError):
    """The index refers to data that is missing: a data file, a block, or part of a tensor."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes or metadata fail validation: checksum mismatch, truncated file, bad header."""


class IndexFormatError(CorruptCheckpointError):
    """The global index is malformed or hostile (wrong types, bad sizes, escaping paths)."""


class StateMismatchError(CheckpointError):
    """The state given to save/load does not fit the checkpoint or is not saveable."""


class MissingKeysError(StateMismatchError):
    """load(strict=True) found keys in the target state that the checkpoint lacks."""


class ReplicaMismatchError(StateMismatchError):
    """A tensor treated as replicated holds different values on different ranks."""


class CheckpointIOError(CheckpointError):
    """The operating system refused a read, write, fsync or rename."""


class CheckpointInUseError(CheckpointError):
    """Another job or manager is saving into the same path or root (its lock is held)."""


class RankFailedError(CheckpointError):
    """Another rank failed during a collective checkpoint operation.

    ``failures`` maps each failing rank to its error message, so every rank reports the same cause.
    """

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = dict(failures)


class CommunicationError(RankFailedError):
    """A collective itself failed: a peer process died or the connection to it broke. Whether a
    commit in flight happened is then unknown on this rank, so nothing it may name is deleted."""

    def __init__(self, message: str) -> None:
        super().__init__(message, {})


class UnsupportedStorageError(CheckpointError):
    """A checkpoint location whose URL scheme has no storage backend (``gs://...``). It is refused,
    never taken as a local directory named after the scheme."""


class StorageAccessError(CheckpointIOError):
    """The storage refused who we are or what we asked: wrong credentials, no permission, a
    read-only filesystem."""


class BucketNotFoundError(CheckpointIOError):
    """The object-store bucket named in the URL does not exist. A configuration mistake, not "no
    checkpoint yet": it must not look like an empty location that a job may start fresh from."""


class ExportError(CheckpointError):
    """The export cannot be done as asked: a bad option (size, dtype, tie), names that clash, a
    tensor safetensors cannot hold, or a destination that already holds an export."""
