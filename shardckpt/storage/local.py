"""Local filesystem storage with real durability: fsync of files and directories, atomic rename.

A checkpoint is a directory of regular files, and nothing in it is followed anywhere else. Every
file and subdirectory inside is opened relative to the checkpoint directory's descriptor, one
component at a time with ``O_NOFOLLOW``, so a symbolic link inside (a data file, ``index.json``,
``data/`` itself) is refused for reads and writes alike: a read is never redirected to a file
outside, a save never writes outside. Only the checkpoint directory itself is resolved like any
path, since ``latest -> step-100`` is common. Files are opened with ``O_NONBLOCK`` and checked with
``fstat`` before any byte is read, so a FIFO, socket or device where a file belongs is refused at
once instead of blocking the open or the read forever.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from shardckpt.errors import (
    CheckpointError,
    CheckpointIOError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageAccessError,
)
from shardckpt.storage.dirs import DIR_FLAGS, make_dirs, sync_directory
from shardckpt.storage.faults import hit
from shardckpt.storage.lock import PathLock


class DataFileWriter:
    """One local data file written by many threads: offsets are reserved under a lock, the bytes are
    written with pwrite outside it, so encoders never wait for each other's I/O.

    Owns ``fd``, an open, writable regular file (``LocalStorage.create`` opens it)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
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
            raise _os_error(f"write to {self.path} failed", e) from e
        return offset

    def finish(self) -> int:
        """fsync and close; returns the file size. Data is durable when this returns."""
        try:
            hit("fsync")
            os.fsync(self._fd)
        except OSError as e:
            raise _os_error(f"fsync of {self.path} failed", e) from e
        finally:
            self.abort()
        return self._end

    def abort(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


# How each kind of access reports a link or a non-regular file: a checkpoint that holds one is
# corrupt when read; a save that meets one refuses to write through it.
_Access = tuple[type[CheckpointError], str]
_READ: _Access = (CorruptCheckpointError, "replace it with the real file, or use another checkpoint")
_WRITE: _Access = (CheckpointIOError, "remove it or save to another directory; nothing was written through it")

# O_NONBLOCK: opening a FIFO must not wait for a writer (or reader); fstat then refuses it.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LocalStorage:
    """A checkpoint directory on a local or shared POSIX filesystem (see the module docstring for
    what is refused). Read descriptors are cached per file until ``close``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return str(self.root)

    def child(self, name: str) -> LocalStorage:
        """``root/name``, refused when it is a symbolic link (a manager never follows a step out of
        its root; only a checkpoint directory that is named directly may be a link)."""
        if len(self._parts(name, _WRITE)) != 1:
            raise CheckpointIOError(f"{self.root / name}: a child is one entry directly inside {self.root}")
        path = self.root / name
        if path.is_symlink():
            raise CheckpointIOError(
                f"{path} is a symbolic link: a step directory is never followed out of the root {self.root}; "
                "remove the link"
            )
        return LocalStorage(path)

    def list_dirs(self, subdir: str = "") -> list[str]:
        """Real directories directly in ``subdir`` (links are not listed); [] if it is missing."""
        return self._scan(subdir, lambda e: e.is_dir(follow_symlinks=False))

    def _scan(self, subdir: str, keep: Callable[[os.DirEntry[str]], bool]) -> list[str]:
        """Sorted names of the entries directly in ``subdir`` that ``keep`` accepts; [] if it is
        missing. ``keep`` runs while the directory is open: an entry's type may need a stat
        relative to it."""
        path = self.root / subdir
        try:
            fd = self._open_dir(subdir, _READ)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise _os_error(f"cannot list {path}", e) from e
        try:
            with os.scandir(fd) as entries:  # scandir works on its own duplicate of fd
                return sorted(e.name for e in entries if keep(e))
        except OSError as e:
            raise _os_error(f"cannot list {path}", e) from e
        finally:
            os.close(fd)

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a regular file here (a link is not); ``""``: whether the directory exists."""
        if not name:
            return self.root.is_dir()
        leaf = self._leaf(name, _READ)
        try:
            parent = self._open_dir(os.path.dirname(name), _READ)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise _os_error(f"cannot look at {self.root / name}", e) from e
        try:
            return stat.S_ISREG(os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise _os_error(f"cannot look at {self.root / name}", e) from e
        finally:
            os.close(parent)

    def delete_tree(self) -> None:
        """Remove the directory and everything in it (links inside are removed, never followed),
        then make its removal from the parent durable. Missing: no error."""
        try:
            if self.root.is_symlink():
                raise CheckpointIOError(f"not removing {self.root}: a symbolic link; nothing outside is deleted")
            shutil.rmtree(self.root)
        except FileNotFoundError:
            return
        except OSError as e:
            raise _os_error(f"cannot remove {self.root}", e) from e
        parent = self.root.parent
        _fsync_directory(parent, None, lambda: os.open(parent, DIR_FLAGS))

    def abort_uploads(self) -> int:
        """Nothing to abort: a killed writer's partial file is a file, listed and removed with its step."""
        return 0

    def lock(self, purpose: str) -> PathLock:
        """An ``flock`` on a hidden file in the directory (storage/lock.py)."""
        return PathLock(self.root, purpose)

    def ensure_dir(self, subdir: str = "") -> None:
        """Create ``subdir`` (and the root) if missing; refuse one that is a link or not a directory.
        New directories above the root's parent get durable entries (``make_dirs``)."""
        try:
            make_dirs(self.root)
            os.close(self._open_dir(subdir, _WRITE, create=True))
        except OSError as e:
            raise _os_error(f"cannot create directory {self.root / subdir}", e) from e

    def create(self, name: str) -> DataFileWriter:
        """Create (or truncate) ``name`` for writing."""
        try:
            fd = self._open_file(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _WRITE)
        except OSError as e:
            raise _os_error(f"cannot create {self.root / name}", e) from e
        return DataFileWriter(self.root / name, fd)

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                path = self.root / name
                try:
                    fd = self._open_file(name, os.O_RDONLY, _READ)
                except FileNotFoundError as e:
                    raise IncompleteCheckpointError(f"data file {path} is missing") from e
                except OSError as e:
                    raise _os_error(f"cannot open {path}", e) from e
                self._fds[name] = fd
            return fd

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        fd = self._fd(name)
        try:
            hit("read")
            data = os.pread(fd, length, offset)
        except OSError as e:
            raise _os_error(f"read of {self.root / name} failed", e) from e
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
            raise _os_error(f"read of {self.root / name} failed", e) from e

    def size(self, name: str) -> int:
        """The size of ``name``, from the descriptor later reads use (so both see the same file)."""
        fd = self._fd(name)
        try:
            return os.fstat(fd).st_size
        except OSError as e:
            raise _os_error(f"cannot stat {self.root / name}", e) from e

    def list(self, subdir: str) -> list[str]:
        """The regular files directly in ``subdir`` (links and others are not listed); [] if it is missing."""
        return [f"{subdir}/{name}" for name in self._scan(subdir, lambda e: e.is_file(follow_symlinks=False))]

    def delete(self, name: str) -> None:
        """Remove ``name`` (a link is removed itself, never its target); a missing file is no error."""
        leaf = self._leaf(name, _WRITE)
        try:
            hit("delete")
            parent = self._open_dir(os.path.dirname(name), _WRITE)
            try:
                os.unlink(leaf, dir_fd=parent)
            finally:
                os.close(parent)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _os_error(f"cannot delete {self.root / name}", e) from e

    def fsync_dir(self, subdir: str = "", point: str = "dir_fsync") -> None:
        """Make the entries of ``subdir`` (created files, renames) durable."""
        _fsync_directory(self.root / subdir, point, lambda: self._open_dir(subdir, _WRITE))

    def fsync_parent(self) -> None:
        """Make this directory's own entry in its parent durable (a new step directory under a root)."""
        parent = self.root.parent
        _fsync_directory(parent, "data_dir_fsync", lambda: os.open(parent, DIR_FLAGS))

    def publish(self, name: str, data: bytes) -> None:
        """Make ``name`` hold ``data`` or leave it as it was: write a temp file, fsync it, rename it
        over ``name``. The old file is never removed first. Once this returns the new file is
        visible; ``fsync_dir`` then makes the rename durable. Raising means nothing was renamed."""
        final = self.root / name
        leaf = self._leaf(name, _WRITE)
        # Predictable, so the open must not follow a link planted under this name.
        tmp = f".{leaf}.tmp-{os.getpid()}-{threading.get_ident()}"
        parent = -1
        try:
            parent = self._open_dir(os.path.dirname(name), _WRITE)
            hit("index_write")
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            fd = self._open_in(parent, tmp, final.with_name(tmp), flags, _WRITE, perms=0o666)  # as open() would
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            hit("rename")
            os.replace(tmp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
        except (OSError, CheckpointIOError) as e:
            if parent >= 0:
                try:
                    os.unlink(tmp, dir_fd=parent)
                except OSError:
                    pass
            if isinstance(e, OSError):
                raise _os_error(f"cannot commit {final}", e) from e
            raise CheckpointIOError(f"cannot commit {final}: {e}") from e
        finally:
            if parent >= 0:
                os.close(parent)

    def read_all(self, name: str, limit: int) -> bytes:
        """Up to ``limit + 1`` bytes of ``name`` (one more than allowed, so the caller sees "too large")."""
        path = self.root / name
        try:
            fd = self._open_file(name, os.O_RDONLY, _READ)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{path} does not exist") from e
        except OSError as e:
            raise _os_error(f"cannot read {path}", e) from e
        try:
            with os.fdopen(fd, "rb") as f:
                # Read what the file holds, never a buffer of ``limit`` bytes: f.read(n) reserves n
                # bytes first, and a 1 GiB reservation for a 300-byte index fails under a memory cap.
                return f.read(min(os.fstat(f.fileno()).st_size, limit) + 1)
        except OSError as e:
            raise _os_error(f"cannot read {path}", e) from e

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    # --- opening without following links --------------------------------------------------------

    def _parts(self, relative: str, access: _Access) -> tuple[str, ...]:
        parts = tuple(relative.split("/")) if relative else ()
        if any(p in ("", ".", "..") for p in parts):
            raise access[0](f"{self.root / relative}: not a plain path inside the checkpoint")
        return parts

    def _leaf(self, name: str, access: _Access) -> str:
        parts = self._parts(name, access)
        if not parts:
            raise access[0](f"{self.root}: a file name is needed, not the checkpoint directory")
        return parts[-1]

    def _open_dir(self, subdir: str, access: _Access, create: bool = False) -> int:
        """A descriptor of ``root/subdir``. The root is resolved like any path (it may be a link);
        every component after it must be a real directory (``create``: made if missing).
        Raises ``OSError`` as the system does (``FileNotFoundError``: something is missing)."""
        parts = self._parts(subdir, access)
        fd = os.open(self.root, DIR_FLAGS)
        path = self.root
        try:
            for part in parts:
                path = path / part
                if create:
                    try:
                        os.mkdir(part, dir_fd=fd)
                    except FileExistsError:
                        pass  # a directory, or something the open below refuses
                try:
                    sub = os.open(part, DIR_FLAGS | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
                except OSError as e:
                    _refuse(fd, part, path, True, access, e)
                    raise
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_file(self, name: str, flags: int, access: _Access) -> int:
        """A blocking descriptor of the regular file ``root/name``, opened with ``flags``."""
        leaf = self._leaf(name, access)
        parent = self._open_dir(os.path.dirname(name), access)
        try:
            return self._open_in(parent, leaf, self.root / name, flags, access)
        finally:
            os.close(parent)

    @staticmethod
    def _open_in(parent: int, leaf: str, path: Path, flags: int, access: _Access, perms: int = 0o644) -> int:
        """``_open_file`` within the directory ``parent``; ``perms`` for a file it creates."""
        try:
            fd = os.open(leaf, flags | _FILE_FLAGS, perms, dir_fd=parent)
        except OSError as e:
            _refuse(parent, leaf, path, False, access, e)
            raise
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise access[0](f"{path} is not a regular file ({_kind(mode)}); a checkpoint holds only regular "
                                f"files: {access[1]}")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _refuse(parent: int, leaf: str, path: Path, want_dir: bool, access: _Access, cause: OSError) -> None:
    """After an open of ``leaf`` failed with ``cause``: raise the access's error when ``leaf`` is a
    link or not what a checkpoint holds there (ELOOP, ENOTDIR, ENXIO, EISDIR say so only vaguely).
    Returns when it is not, for the caller to raise ``cause``."""
    try:
        mode = os.stat(leaf, dir_fd=parent, follow_symlinks=False).st_mode
    except OSError:
        return
    error, advice = access
    if stat.S_ISLNK(mode):
        raise error(f"{path} is a symbolic link; a checkpoint never contains links (only the checkpoint "
                    f"directory itself may be one): {advice}") from cause
    if want_dir and not stat.S_ISDIR(mode):
        raise error(f"{path} is not a directory ({_kind(mode)}): {advice}") from cause
    if not want_dir and not stat.S_ISREG(mode):
        raise error(f"{path} is not a regular file ({_kind(mode)}); a checkpoint holds only regular files: "
                    f"{advice}") from cause


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISLNK, "a symbolic link"))
    return next((name for test, name in kinds if test(mode)), f"file type {stat.S_IFMT(mode):#o}")


def _os_error(message: str, cause: OSError) -> CheckpointIOError:
    """``message: reason`` as the error for ``cause``: a refusal of permission (or a read-only
    filesystem) is a ``StorageAccessError``, the same error an object store gives for a denied request."""
    kind = StorageAccessError if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else CheckpointIOError
    return kind(f"{message}: {cause.strerror}")


def _fsync_directory(path: Path, point: str | None, open_dir: Callable[[], int]) -> None:
    try:
        if point is not None:
            hit(point)
        sync_directory(open_dir)
    except OSError as e:
        raise _os_error(f"fsync of directory {path} failed", e) from e
