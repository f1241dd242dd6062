"""The S3 data-file writer: concurrent appends into part buffers, parts uploaded as they fill
(a multipart upload), or one PUT for a file within one part. See storage/s3.py for the semantics."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from shardckpt.errors import CheckpointError, CheckpointIOError
from shardckpt.storage.faults import hit

if TYPE_CHECKING:
    from shardckpt.storage.s3 import S3Storage

log = logging.getLogger(__name__)

_PARTS_PER_TIER = 1000  # part sizes double every 1000 parts, so 10000 parts reach ~16 TB at 16 MiB
_MAX_PARTS = 10000


def part_span(index: int, part_size: int) -> tuple[int, int]:
    """(offset, size) of part ``index`` (0-based): 1000 parts of ``part_size``, then 1000 of twice that..."""
    tier, i = divmod(index, _PARTS_PER_TIER)
    size = part_size << tier
    return part_size * _PARTS_PER_TIER * ((1 << tier) - 1) + i * size, size


def part_at(offset: int, part_size: int) -> int:
    """The part that holds byte ``offset``."""
    tier, base = 0, 0
    while offset >= base + _PARTS_PER_TIER * (part_size << tier):
        base += _PARTS_PER_TIER * (part_size << tier)
        tier += 1
    return tier * _PARTS_PER_TIER + (offset - base) // (part_size << tier)


class S3DataWriter:
    """One data object written by many threads: offsets are reserved under a lock, bytes are copied
    into part buffers outside it, and each part is uploaded as soon as it is full, several at once
    (at most ``max_concurrency`` in flight: an append waits beyond that, so memory stays bounded
    when the network is slower than the encoders). A file that stays within one part is one PUT."""

    def __init__(self, storage: S3Storage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.path = f"{storage.location}/{name}"
        self._key = storage.key(name)
        self._part = storage.options.part_size
        self._end = 0
        self._lock = threading.Lock()
        self._bufs: dict[int, bytearray] = {}
        self._filled: dict[int, int] = {}
        self._submitted: set[int] = set()
        self._inflight: set[Future[None]] = set()
        self._failure: BaseException | None = None
        self._etags: dict[int, str] = {}
        self._upload: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def append(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        with self._lock:
            if self._closed:
                raise CheckpointIOError(f"write to {self.path} after it was finished or aborted")
            offset = self._end
            self._end += n
        try:
            hit("write")
        except OSError as e:
            raise CheckpointIOError(f"write to {self.path} failed: {e.strerror}") from e
        done = 0
        full: list[int] = []
        while done < n:
            k = part_at(offset + done, self._part)
            start, size = part_span(k, self._part)
            if k >= _MAX_PARTS:
                raise CheckpointIOError(f"write to {self.path}: more than {_MAX_PARTS} parts; raise S3Options.part_size")
            at = offset + done - start
            take = min(n - done, size - at)
            with self._lock:
                buf = self._bufs.setdefault(k, bytearray(size)) if k not in self._submitted else None
            if buf is None:
                raise CheckpointIOError(f"write to {self.path}: part {k + 1} was already uploaded")
            buf[at : at + take] = view[done : done + take]  # disjoint ranges: no lock needed
            with self._lock:
                self._filled[k] = self._filled.get(k, 0) + take
                if self._filled[k] == size:
                    full.append(k)
            done += take
        for k in full:
            self._submit(k, part_span(k, self._part)[1])
        self._throttle()
        return offset

    def finish(self) -> int:
        """Upload what is left and complete the object; returns its size."""
        try:
            hit("fsync")
        except OSError as e:
            raise CheckpointIOError(f"completing {self.path} failed: {e.strerror}") from e
        with self._lock:
            self._closed = True
            end = self._end
        client, bucket = self.storage.client, self.storage.bucket
        try:
            if self._upload is None and not self._submitted:
                body = bytes(self._bufs.get(0, bytearray())[:end])
                client.put_object(Bucket=bucket, Key=self._key, Body=body)
            else:
                last = part_at(end - 1, self._part)
                if last not in self._submitted:
                    self._submit(last, end - part_span(last, self._part)[0])
                self._drain()
                parts = [{"PartNumber": k + 1, "ETag": self._etags[k]} for k in sorted(self._etags)]
                if len(parts) != last + 1:
                    raise CheckpointIOError(f"{self.path}: {len(parts)} parts uploaded, {last + 1} expected")
                client.complete_multipart_upload(Bucket=bucket, Key=self._key, UploadId=self._upload,  # type: ignore[arg-type]
                                                 MultipartUpload={"Parts": parts})  # type: ignore[typeddict-item]
                self._upload = None
        except CheckpointError:
            raise
        except Exception as e:
            raise self.storage._error(e, "cannot write", self.name) from e
        finally:
            self.abort()
        return end

    def abort(self) -> None:
        """Stop: wait for the parts in flight and abort the upload if it was not completed."""
        with self._lock:
            self._closed = True
            pending = list(self._inflight)
        for f in pending:
            f.cancel()
        wait(pending)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        upload, self._upload = self._upload, None
        if upload is not None:
            try:
                self.storage.client.abort_multipart_upload(Bucket=self.storage.bucket, Key=self._key, UploadId=upload)
            except Exception as e:  # noqa: BLE001 - best effort; a lifecycle rule removes what is left
                log.warning("could not abort the upload of %s: %s", self.path, e)
        self._bufs.clear()

    def _submit(self, k: int, length: int) -> None:
        with self._lock:
            if self._failure is not None:
                raise self._failed()
            if self._upload is None:
                try:
                    r = self.storage.client.create_multipart_upload(Bucket=self.storage.bucket, Key=self._key)
                except Exception as e:
                    raise self.storage._error(e, "cannot write", self.name) from e
                self._upload = r["UploadId"]
                self._pool = ThreadPoolExecutor(self.storage.options.max_concurrency,
                                                thread_name_prefix="shardckpt-s3-part")
            self._submitted.add(k)
            buf = self._bufs[k]
            assert self._pool is not None
            future = self._pool.submit(self._upload_part, k, buf if length == len(buf) else bytes(buf[:length]))
            self._inflight.add(future)
        future.add_done_callback(self._part_done)

    def _upload_part(self, k: int, body: bytes | bytearray) -> None:
        assert self._upload is not None
        r = self.storage.client.upload_part(Bucket=self.storage.bucket, Key=self._key, UploadId=self._upload,
                                            PartNumber=k + 1, Body=body)
        with self._lock:
            self._etags[k] = r["ETag"]
            self._bufs.pop(k, None)  # the memory goes as soon as the part is stored

    def _part_done(self, f: Future[None]) -> None:
        with self._lock:
            self._inflight.discard(f)
            if not f.cancelled() and f.exception() is not None and self._failure is None:
                self._failure = f.exception()

    def _throttle(self) -> None:
        while True:
            with self._lock:
                if self._failure is not None:
                    raise self._failed()
                pending = {f for f in self._inflight if not f.done()}
            if len(pending) <= self.storage.options.max_concurrency:
                return
            wait(pending, return_when=FIRST_COMPLETED)

    def _drain(self) -> None:
        with self._lock:
            pending = list(self._inflight)
        wait(pending)
        for f in pending:
            if f.exception() is not None and self._failure is None:
                self._failure = f.exception()
        if self._failure is not None:
            raise self._failed()

    def _failed(self) -> CheckpointIOError:
        e = self._failure
        assert e is not None
        if isinstance(e, CheckpointIOError):
            return e
        err = self.storage._error(e, "cannot write", self.name)
        err.__cause__ = e
        return err
