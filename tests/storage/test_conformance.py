"""One suite every storage backend runs (zarr's StoreTests are the model): write, ranged read,
list, delete, atomic publish, a missing object, a permission error. The S3 backend runs it against
a real moto server on 127.0.0.1 (conftest.py); the client is never mocked."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardckpt.errors import (
    CheckpointError,
    CheckpointIOError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    StorageAccessError,
)
from shardckpt.storage import Storage, faults, open_storage
from shardckpt.storage.s3 import MIN_PART, S3Options
from tests.backends import MotoS3

pytestmark = pytest.mark.timeout(120)


class Backend:
    """Makes storages of one kind at fresh locations, and read-only views of them."""

    name: str

    def storage(self) -> Storage:
        raise NotImplementedError

    def read_only(self, storage: Storage) -> Storage:
        raise NotImplementedError


class LocalBackend(Backend):
    name = "local"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.n = 0
        self.frozen: list[Path] = []

    def storage(self) -> Storage:
        self.n += 1
        return open_storage(self.tmp / f"loc{self.n}")

    def read_only(self, storage: Storage) -> Storage:
        root = Path(storage.location)
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # root ignores modes; an immutable directory refuses even root
            if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(root)]).returncode:
                pytest.skip("running as root and chattr +i does not work here")
        else:
            for d in (root, *[p for p in root.rglob("*") if p.is_dir()]):
                d.chmod(0o555)
        self.frozen.append(root)
        return open_storage(root)

    def thaw(self) -> None:
        for root in self.frozen:
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-R", "-i", str(root)], check=False)
            else:
                for d in (root, *[p for p in root.rglob("*") if p.is_dir()]):
                    d.chmod(0o755)


class S3Backend(Backend):
    name = "s3"

    def __init__(self, s3: MotoS3, prefix: str) -> None:
        self.s3 = s3
        self.prefix = prefix
        self.n = 0
        # The smallest part S3 allows, so a few MiB already take the multipart path.
        self.options = S3Options(endpoint_url=s3.endpoint, access_key_id=s3.key, secret_access_key=s3.secret,
                                 region="us-east-1", part_size=MIN_PART, max_concurrency=3)

    def storage(self) -> Storage:
        self.n += 1
        return open_storage(self.s3.url(self.prefix, f"loc{self.n}"), s3=self.options)

    def read_only(self, storage: Storage) -> Storage:
        ro = S3Options(endpoint_url=self.s3.endpoint, access_key_id=self.s3.ro_key,
                       secret_access_key=self.s3.ro_secret, region="us-east-1")
        return open_storage(storage.location, s3=ro)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        local = LocalBackend(tmp_path)
        try:
            yield local
        finally:
            local.thaw()
    else:
        s3 = request.getfixturevalue("moto_s3")
        yield S3Backend(s3, request.getfixturevalue("s3_prefix"))


def _write(storage: Storage, name: str, chunks: list[bytes], threads: int = 1) -> int:
    """Append ``chunks`` from ``threads`` threads; returns the size. Checks that every append got
    its own offset and that the offsets tile the file."""
    out = storage.create(name)
    offsets: dict[int, int] = {}
    lock = threading.Lock()

    def work(indices: list[int]) -> None:
        for i in indices:
            off = out.append(chunks[i])
            with lock:
                offsets[i] = off

    try:
        ts = [threading.Thread(target=work, args=(list(range(t, len(chunks), threads)),)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        size = out.finish()
    except BaseException:
        out.abort()
        raise
    spans = sorted((offsets[i], len(chunks[i])) for i in range(len(chunks)))
    pos = 0
    for off, n in spans:
        assert off == pos, "appends overlap or leave a hole"
        pos += n
    assert size == pos == sum(map(len, chunks))
    return size


def _content(storage: Storage, name: str) -> bytes:
    return storage.read_range(name, 0, storage.size(name))


def test_write_then_ranged_reads(backend: Backend):
    s = backend.storage()
    s.ensure_dir("data")
    chunks = [bytes([i]) * (100 + i) for i in range(20)]
    size = _write(s, "data/a.bin", chunks)
    whole = b"".join(chunks)
    assert s.size("data/a.bin") == size
    assert s.read_range("data/a.bin", 0, size) == whole
    assert s.read_range("data/a.bin", 150, 333) == whole[150:483]
    assert s.read_range("data/a.bin", 7, 0) == b""
    buf = bytearray(64)
    s.read_into("data/a.bin", size - 64, memoryview(buf))
    assert bytes(buf) == whole[-64:]
    s.close()


def test_large_concurrent_write_is_exact(backend: Backend):
    # Several parts on S3 (5 MiB parts), appended from 4 threads in whatever order they finish.
    s = backend.storage()
    s.ensure_dir("data")
    chunks = [os.urandom(1 << 20) for _ in range(13)] + [os.urandom(12345)]
    _write(s, "data/big.bin", chunks, threads=4)
    got = _content(s, "data/big.bin")
    # Offsets were reserved in some order: every chunk is somewhere, whole, and nothing else is.
    assert len(got) == sum(map(len, chunks))
    assert sorted(got.find(c) for c in chunks) == sorted(set(got.find(c) for c in chunks))
    assert all(got.find(c) >= 0 for c in chunks)


def test_read_past_the_end_is_a_truncated_file(backend: Backend):
    s = backend.storage()
    s.ensure_dir("data")
    _write(s, "data/a.bin", [b"x" * 100])
    with pytest.raises(IncompleteCheckpointError, match="truncated"):
        s.read_range("data/a.bin", 50, 100)
    with pytest.raises(IncompleteCheckpointError, match="truncated"):
        s.read_range("data/a.bin", 200, 10)


def test_list_exists_and_delete(backend: Backend):
    s = backend.storage()
    assert not s.exists("") and s.list("data") == [] and s.list_dirs() == []
    s.ensure_dir("data")
    for name in ("data/b.bin", "data/a.bin"):
        _write(s, name, [b"1234"])
    s.publish("index.json", b"{}")
    assert s.exists("") and s.exists("data/a.bin") and s.exists("index.json") and not s.exists("data/c.bin")
    assert s.list("data") == ["data/a.bin", "data/b.bin"]
    assert s.list_dirs() == ["data"]
    s.delete("data/a.bin")
    s.delete("data/a.bin")  # a missing object is no error
    assert s.list("data") == ["data/b.bin"] and not s.exists("data/a.bin")


def test_children_and_delete_tree(backend: Backend):
    root = backend.storage()
    for step in ("step-00000001", "step-00000002"):
        child = root.child(step)
        child.ensure_dir("data")
        _write(child, "data/x.bin", [b"abc"])
        child.publish("index.json", step.encode())
    assert root.list_dirs() == ["step-00000001", "step-00000002"]
    assert root.child("step-00000002").read_all("index.json", 100) == b"step-00000002"
    gone = root.child("step-00000001")
    gone.delete("index.json")
    gone.fsync_dir("")
    gone.delete_tree()
    assert root.list_dirs() == ["step-00000002"] and not gone.exists("")
    assert root.child("step-00000002").list("data") == ["data/x.bin"]


def test_publish_replaces_atomically_and_a_failed_publish_changes_nothing(backend: Backend):
    s = backend.storage()
    s.ensure_dir()
    s.publish("index.json", b"first")
    s.publish("index.json", b"second, longer")
    assert s.read_all("index.json", 1 << 20) == b"second, longer"
    assert s.read_all("index.json", 3) == b"seco"  # limit + 1 bytes: the caller sees "too large"
    for point in ("index_write", "rename"):
        faults.configure(f"{point}:1:eio")
        try:
            with pytest.raises(CheckpointIOError, match="cannot commit"):
                s.publish("index.json", b"third")
        finally:
            faults.configure("")
        assert s.read_all("index.json", 1 << 20) == b"second, longer"
    # Nothing but the published object is left behind (no temp files, no half objects).
    if backend.name == "local":
        assert sorted(p.name for p in Path(s.location).iterdir()) == ["index.json"]
    else:
        assert s.list_dirs() == [] and s.exists("index.json")


def test_missing_objects_give_the_right_errors(backend: Backend):
    s = backend.storage()
    s.ensure_dir("data")
    with pytest.raises(IncompleteCheckpointError, match="data/nope.bin.*missing"):
        s.size("data/nope.bin")
    with pytest.raises(IncompleteCheckpointError, match="data/nope.bin.*missing"):
        s.read_range("data/nope.bin", 0, 4)
    with pytest.raises(CheckpointNotFoundError, match="index.json"):
        s.read_all("index.json", 100)
    assert not s.exists("index.json")


def test_permission_error_names_the_location(backend: Backend, request: pytest.FixtureRequest):
    if backend.name == "s3":
        request.getfixturevalue("s3_auth")
    s = backend.storage()
    s.ensure_dir("data")
    _write(s, "data/a.bin", [b"kept"])
    s.publish("index.json", b"v1")
    ro = backend.read_only(s)
    assert ro.read_all("index.json", 100) == b"v1"  # reading is allowed
    assert ro.read_range("data/a.bin", 0, 4) == b"kept"

    def fails(action: Callable[[], object]) -> StorageAccessError:
        with pytest.raises(StorageAccessError) as info:
            action()
        assert s.location in str(info.value)
        assert isinstance(info.value, CheckpointError)
        return info.value

    fails(lambda: ro.publish("index.json", b"v2"))
    fails(lambda: _write(ro, "data/b.bin", [b"new" * 10]))
    assert s.read_all("index.json", 100) == b"v1"
