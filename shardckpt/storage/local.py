"""Local filesystem storage with real durability: fsync of files and directories, atomic rename."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Protocol

from shardckpt.errors import CheckpointIOError, IncompleteCheckpointError
from shardckpt.storage.faults import hit


class Storage(Protocol):
    root: Path

    def create(self, name: str) -> DataFileWriter: ...

    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def read_into(self, name: str, offset: int, buf: memoryview) -> None: ...

    def size(self, name: str) -> int: ...

    def list(self, subdir: str) -> list[str]: ...

    def delete(self, name: str) -> None: ...

    def publish(self, name: str, data: bytes) -> None: ...

    def read_all(self, name: str, limit: int) -> bytes: ...


class DataFileWriter:
    """One data file written by many threads: offsets are reserved under a lock, the bytes are
    written with pwrite outside it, so encoders never wait for each other's I/O."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise CheckpointIOError(f"cannot create {path}: {e.strerror}") from e
        self._end = 0
        self._lock = threading.Lock()

    def append(self, data: bytes | memoryview) -> int:
        """Write ``data`` at the next free offset and return that offset."""
        n = len(data)
        with self._lock:
            offset = self._end
            self._end += n
        view = memoryview(data).cast("B")
        done = 0
        try:
            hit("write")
            while done < n:
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as e:
            raise CheckpointIOError(f"write to {self.path} failed: {e.strerror}") from e
        return offset

    @property
    def size(self) -> int:
        return self._end

    def finish(self) -> int:
        """fsync and close; returns the file size. Data is durable when this returns."""
        try:
            hit("fsync")
            os.fsync(self._fd)
        except OSError as e:
            raise CheckpointIOError(f"fsync of {self.path} failed: {e.strerror}") from e
        finally:
            self.abort()
        return self._end

    def abort(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class LocalStorage:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def ensure_dir(self, subdir: str = "") -> None:
        path = self.root / subdir
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointIOError(f"cannot create directory {path}: {e.strerror}") from e

    def create(self, name: str) -> DataFileWriter:
        return DataFileWriter(self.root / name)

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                path = self.root / name
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError as e:
                    raise IncompleteCheckpointError(f"data file {path} is missing") from e
                except OSError as e:
                    raise CheckpointIOError(f"cannot open {path}: {e.strerror}") from e
                self._fds[name] = fd
            return fd

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        fd = self._fd(name)
        try:
            hit("read")
            data = os.pread(fd, length, offset)
        except OSError as e:
            raise CheckpointIOError(f"read of {self.root / name} failed: {e.strerror}") from e
        if len(data) != length:
            raise IncompleteCheckpointError(
                f"data file {self.root / name} is truncated: wanted bytes [{offset}, {offset + length}), "
                f"got {len(data)}"
            )
        return data

    def read_into(self, name: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``name`` at ``offset`` with no intermediate copy (preadv)."""
        fd = self._fd(name)
        done, n = 0, len(buf)
        try:
            hit("read")
            while done < n:
                got = os.preadv(fd, [buf[done:]], offset + done)
                if got == 0:
                    raise IncompleteCheckpointError(
                        f"data file {self.root / name} is truncated: wanted bytes [{offset}, {offset + n}), got {done}"
                    )
                done += got
        except OSError as e:
            raise CheckpointIOError(f"read of {self.root / name} failed: {e.strerror}") from e

    def size(self, name: str) -> int:
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError as e:
            raise IncompleteCheckpointError(f"data file {self.root / name} is missing") from e
        except OSError as e:
            raise CheckpointIOError(f"cannot stat {self.root / name}: {e.strerror}") from e

    def list(self, subdir: str) -> list[str]:
        path = self.root / subdir
        try:
            return sorted(f"{subdir}/{p.name}" for p in path.iterdir() if p.is_file())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CheckpointIOError(f"cannot list {path}: {e.strerror}") from e

    def delete(self, name: str) -> None:
        try:
            hit("delete")
            (self.root / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CheckpointIOError(f"cannot delete {self.root / name}: {e.strerror}") from e

    def fsync_dir(self, subdir: str = "", point: str = "dir_fsync") -> None:
        """Make the entries of ``subdir`` (created files, renames) durable."""
        _fsync_directory(self.root / subdir, point)

    def fsync_parent(self) -> None:
        """Make this directory's own entry in its parent durable (a new step directory under a root)."""
        _fsync_directory(self.root.parent, "data_dir_fsync")

    def publish(self, name: str, data: bytes) -> None:
        """Make ``name`` hold ``data`` or leave it as it was: write a temp file, fsync it, rename it
        over ``name``. The old file is never removed first. Once this returns the new file is
        visible; ``fsync_dir`` then makes the rename durable. Raising means nothing was renamed."""
        final = self.root / name
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            hit("index_write")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            hit("rename")
            os.replace(tmp, final)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise CheckpointIOError(f"cannot commit {final}: {e.strerror}") from e

    def read_all(self, name: str, limit: int) -> bytes:
        path = self.root / name
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise  # the caller turns a missing index into CheckpointNotFoundError
        except OSError as e:
            raise CheckpointIOError(f"cannot read {path}: {e.strerror}") from e
        return data

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def _fsync_directory(path: Path, point: str) -> None:
    try:
        hit(point)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some filesystems cannot fsync directories
            raise CheckpointIOError(f"fsync of directory {path} failed: {e.strerror}") from e
