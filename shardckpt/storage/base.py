"""The storage interface every path uses (save, load, verify, the manager, cleanup, the CLI).

A backend holds one checkpoint location: a directory (``LocalStorage``) or a key prefix in a
bucket (``S3Storage``). Names are relative to it, ``/``-separated (``index.json``, ``data/x.bin``).
``open_storage`` (storage/resolve.py) picks the backend from a path or URL.

What a backend promises, and what callers may rely on whatever the backend:

- ``create`` returns a writer that many threads append to; its bytes are durable once ``finish``
  returns, and a writer that is aborted leaves no object behind (local: a file the caller deletes).
- ``publish`` is the commit point: afterwards ``name`` holds the new bytes, before it the old ones
  (or nothing); never a mix, never nothing in between.
- ``fsync_dir``/``fsync_parent`` make created names durable where the backend needs that (POSIX);
  where a finished write is already durable (an object store) they only pass the fault point.
- A missing object: ``read_range``/``read_into``/``size`` raise ``IncompleteCheckpointError`` (the
  index names data that is not there); ``read_all`` raises ``CheckpointNotFoundError``.
- A refusal of credentials or permission is a ``StorageAccessError``; a missing bucket a
  ``BucketNotFoundError``; any other failure of the storage a ``CheckpointIOError``. Messages name
  the location and the object.
"""

from __future__ import annotations

from typing import Protocol

# ``list`` is also a method name of the classes below, where it would shadow the builtin.
_Names = list[str]


class DataWriter(Protocol):
    """One data file (object) written by many threads at once."""

    def append(self, data: bytes | memoryview) -> int:
        """Write ``data`` at the next free offset and return that offset."""
        ...

    def finish(self) -> int:
        """Make every appended byte durable and return the size. Once this returns the data is there."""
        ...

    def abort(self) -> None:
        """Give up: release what the writer holds (idempotent; also called after ``finish``)."""
        ...


class StorageLock(Protocol):
    """Who may save into a location: one job at a time (see each backend for how far that holds)."""

    @property
    def held(self) -> bool: ...

    def acquire(self) -> None:
        """Take the lock or raise ``CheckpointInUseError`` naming its holder; never waits."""
        ...

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; False when somebody does."""
        ...

    def release(self) -> None: ...


class Storage(Protocol):
    """One checkpoint location; see the module docstring for the promises every backend keeps."""

    @property
    def location(self) -> str:
        """The location as a user would write it (a directory path, ``s3://bucket/prefix``)."""
        ...

    def child(self, name: str) -> Storage:
        """The location of the entry ``name`` directly inside this one (a manager's step). A local
        entry that is a symbolic link is refused: nothing is followed out of a manager root."""
        ...

    def ensure_dir(self, subdir: str = "") -> None:
        """Make ``subdir`` ready for writes (a directory is created; an object store checks the bucket)."""
        ...

    def create(self, name: str) -> DataWriter:
        """A writer for a new ``name`` (an existing one is replaced once the writer finishes)."""
        ...

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of ``name`` from ``offset``; fewer are a truncated file."""
        ...

    def read_into(self, name: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``len(buf)`` bytes of ``name`` from ``offset``."""
        ...

    def size(self, name: str) -> int:
        """The size of ``name``, as later reads of it see it."""
        ...

    def list(self, subdir: str) -> _Names:
        """Names (``subdir/leaf``) of the files directly in ``subdir``, sorted; [] when there are none."""
        ...

    def list_dirs(self, subdir: str = "") -> _Names:
        """Leaf names of the entries directly in ``subdir`` that hold files (local: real
        directories, never links), sorted."""
        ...

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a file here; ``""``: whether the location itself exists (local: the
        directory; an object store: any object under the prefix)."""
        ...

    def delete(self, name: str) -> None:
        """Remove ``name``; a missing one is no error."""
        ...

    def delete_tree(self) -> None:
        """Remove everything at this location. Not atomic: delete the index first (and make that
        durable) so that a crash in between leaves a torn location, never a damaged committed one."""
        ...

    def abort_uploads(self) -> int:
        """Abort the uploads left open anywhere under this location (an object store's multipart
        uploads of a writer that was killed: invisible as objects, yet stored until aborted) and
        return how many. Only for a location no save is writing into. Local: nothing to do, 0 (a
        killed writer leaves a file, which listing sees)."""
        ...

    def fsync_dir(self, subdir: str = "", point: str = "dir_fsync") -> None:
        """Make the names created in ``subdir`` durable (a no-op past the fault point on object stores)."""
        ...

    def fsync_parent(self) -> None:
        """Make this location's own entry in its parent durable (a no-op on object stores)."""
        ...

    def publish(self, name: str, data: bytes) -> None:
        """Atomically make ``name`` hold ``data``: the commit point of a save."""
        ...

    def read_all(self, name: str, limit: int) -> bytes:
        """Up to ``limit + 1`` bytes of the small object ``name`` (one more, so the caller sees "too large")."""
        ...

    def lock(self, purpose: str) -> StorageLock:
        """The lock a job holds while it saves here (not taken yet)."""
        ...

    def close(self) -> None:
        """Release what reads cached (descriptors, sizes); the storage stays usable."""
        ...
