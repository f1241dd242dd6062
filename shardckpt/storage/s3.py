"""S3 and S3-compatible object storage (MinIO, Ceph RGW, moto...), through boto3.

A checkpoint at ``s3://bucket/prefix`` is the objects ``prefix/index.json`` and
``prefix/data/<save>-r<rank>.bin``. What the object store gives, and what it does not:

- A data file is one object, written as a multipart upload: parts are uploaded (several at once)
  as soon as the encoders have filled them, and the object appears only when the upload completes,
  whole. A file smaller than one part is a single PUT. A failed or aborted writer aborts its upload.
- The commit is the single PUT of ``index.json``, written last: S3 replaces an object atomically,
  so readers see the old index or the new one. There is no rename and no directory to fsync.
- Loads read with ranged GETs, pinned to the ETag that ``size`` saw: an index or data file replaced
  during a load is a ``CorruptCheckpointError``, never a mix of two saves.
- Listing is by prefix and delimiter: a step "directory" exists when some object has its prefix.
  A save killed mid-upload leaves no object of that file (only an incomplete upload, which the
  store keeps until it is aborted: a manager's cleanup aborts those under its root,
  ``abort_uploads``; elsewhere set a lifecycle rule ``AbortIncompleteMultipartUpload``).
- Locks: there is no ``flock``. ``lock`` is a single-writer assumption, not a lock: one job saves
  into a prefix (or manager root) at a time, and the caller must see to it. A conditional PUT
  (If-None-Match) could take a lock object, but a job killed while holding it would lock the
  prefix until someone deletes it; without a heartbeat and lease takeover that makes a preempted
  job unable to restart, which is worse than the assumption. docs/object_storage.md says so.

Configuration is the standard AWS environment, as boto3 reads it (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, config
files), plus ``AWS_REGION``; ``S3Options`` overrides any of it. boto3 is imported only here, and
this module only when an ``s3://`` location is opened.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shardckpt.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointIOError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageAccessError,
)
from shardckpt.storage.faults import hit
from shardckpt.storage.s3_writer import S3DataWriter

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client  # type-only; falls back to Any without the stubs

log = logging.getLogger(__name__)

MIN_PART = 5 << 20  # S3's smallest part (all but the last)
_ACCESS_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity",
})


# ``list`` is also a method name of the classes below, where it would shadow the builtin.
_Names = list[str]
_Pages = list[dict[str, Any]]  # boto3 responses (untyped without the stubs)


@dataclass(frozen=True)
class S3Options:
    """Overrides of the AWS environment for one S3 location; None keeps what the environment says.

    ``part_size``: bytes per multipart part (at least 5 MiB; parts double in size every 1000 parts,
    so a data file may exceed 10000 x part_size). ``max_concurrency``: parts of one data file in
    flight at once, and the connection pool size."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    region: str | None = None
    profile: str | None = None
    part_size: int = 16 << 20
    max_concurrency: int = 8
    max_attempts: int = 3
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


# Building a client means a boto3 session that parses the service models from JSON: 0.1-0.7 s of
# CPU, which every open_storage paid (a restore opens each step it checks, a save several times).
# boto3 clients are thread-safe, so one per configuration is shared. The key holds the AWS_*
# environment (a changed environment builds a new client) and the pid (a connection pool must not
# cross a fork). Few configurations exist per process; the cache is bounded all the same.
_CLIENTS: OrderedDict[tuple[object, ...], S3Client] = OrderedDict()
_CLIENTS_LOCK = threading.Lock()
_CLIENTS_MAX = 8


def _client(options: S3Options) -> S3Client:
    """The client for ``options`` and the current AWS environment, built once per process."""
    key = (os.getpid(), options, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is not None:
            _CLIENTS.move_to_end(key)
            return client
    client = _new_client(options)
    with _CLIENTS_LOCK:
        client = _CLIENTS.setdefault(key, client)  # another thread may have built one meanwhile
        while len(_CLIENTS) > _CLIENTS_MAX:
            _CLIENTS.popitem(last=False)
    return client


def _new_client(options: S3Options) -> S3Client:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise CheckpointError("s3:// locations need boto3: pip install 'shardckpt[s3]'") from e
    # botocore reads AWS_DEFAULT_REGION; AWS_REGION is the name the issue and most SDKs use.
    region = options.region or os.environ.get("AWS_REGION") or None
    config = Config(
        max_pool_connections=max(16, 2 * options.max_concurrency),
        retries={"max_attempts": options.max_attempts, "mode": "standard"},
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
    )
    try:
        # A profile missing from ~/.aws (S3Options.profile or AWS_PROFILE) fails here, in the session.
        session = boto3.session.Session(profile_name=options.profile) if options.profile else boto3.session.Session()
        return session.client(  # type: ignore[no-any-return]
            "s3", endpoint_url=options.endpoint_url, region_name=region, aws_access_key_id=options.access_key_id,
            aws_secret_access_key=options.secret_access_key, aws_session_token=options.session_token, config=config,
        )
    except Exception as e:  # botocore raises ValueError and its own errors for a bad endpoint, region or profile
        raise CheckpointIOError(f"cannot configure the S3 client ({type(e).__name__}: {e})") from e


class _SingleWriter:
    """The "lock" of an S3 location: records that this job saves here, excludes nobody (see the
    module docstring for why no lock object is taken)."""

    def __init__(self) -> None:
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> None:
        self._held = True

    def try_acquire(self) -> bool:
        self._held = True
        return True

    def release(self) -> None:
        self._held = False


class S3Storage:
    """One checkpoint location ``s3://bucket/prefix`` (see the module docstring)."""

    def __init__(self, bucket: str, prefix: str, options: S3Options | None = None,
                 client: S3Client | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options or S3Options()
        if self.options.part_size < MIN_PART:
            raise CheckpointError(f"S3 part_size must be at least {MIN_PART} bytes, not {self.options.part_size}")
        try:
            self.client = client if client is not None else _client(self.options)
        except CheckpointIOError as e:
            raise CheckpointIOError(f"{self.location}: {e}") from e
        self._base = f"{self.prefix}/" if self.prefix else ""
        self._meta: dict[str, tuple[int, str]] = {}  # name -> (size, ETag) as size() saw it
        self._lock = threading.Lock()
        self._bucket_checked = False

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, name: str) -> str:
        parts = name.split("/") if name else []
        if not parts or any(p in ("", ".", "..") for p in parts):
            raise CorruptCheckpointError(f"{self.location}/{name}: not a plain name inside the checkpoint")
        return self._base + name

    def child(self, name: str) -> S3Storage:
        if "/" in name:
            raise CheckpointIOError(f"{self.location}/{name}: a child is one entry directly inside {self.location}")
        self.key(name)
        return S3Storage(self.bucket, self._base + name, self.options, self.client)

    def ensure_dir(self, subdir: str = "") -> None:
        """No directories to create; checks once that the bucket is there and ours to use."""
        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            if _status(e) == 404:
                raise self._no_bucket() from e
            raise self._error(e, "cannot use") from e
        self._bucket_checked = True

    def create(self, name: str) -> S3DataWriter:
        return S3DataWriter(self, name)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        extra = {}
        with self._lock:
            meta = self._meta.get(name)
        if meta is not None:
            extra["IfMatch"] = meta[1]
        where = f"{self.location}/{name}"
        try:
            hit("read")
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(name), Range=f"bytes={offset}-{offset + length - 1}",
                                       **extra)
            data = r["Body"].read()
        except CheckpointError:
            raise
        except Exception as e:
            code = _code(e)
            if code in ("NoSuchKey", "404"):
                raise IncompleteCheckpointError(f"data file {where} is missing") from e
            if code == "InvalidRange":
                raise IncompleteCheckpointError(
                    f"data file {where} is truncated: wanted bytes [{offset}, {offset + length}), it is shorter") from e
            if code == "PreconditionFailed":
                raise CorruptCheckpointError(f"{where} was replaced while it was being read (its ETag changed)") from e
            raise self._error(e, f"read of {name} failed in") from e
        if len(data) != length:
            raise IncompleteCheckpointError(
                f"data file {where} is truncated: wanted bytes [{offset}, {offset + length}), got {len(data)}")
        return bytes(data)

    def read_into(self, name: str, offset: int, buf: memoryview) -> None:
        view = memoryview(buf).cast("B")
        view[:] = self.read_range(name, offset, len(view))

    def size(self, name: str) -> int:
        """The object's size, by HEAD; its ETag pins every later read of it until ``close``."""
        with self._lock:
            meta = self._meta.get(name)
        if meta is None:
            try:
                r = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
            except CheckpointError:
                raise
            except Exception as e:
                if _status(e) == 404:
                    self._check_bucket(e)
                    raise IncompleteCheckpointError(f"data file {self.location}/{name} is missing") from e
                raise self._error(e, f"cannot stat {name} in") from e
            meta = (int(r["ContentLength"]), str(r["ETag"]))
            with self._lock:
                self._meta[name] = meta
        return meta[0]

    def list(self, subdir: str) -> _Names:
        prefix = self.key(subdir) + "/" if subdir else self._base
        found: list[str] = []
        for page in self._pages(prefix, "/"):
            for obj in page.get("Contents", []):
                leaf = obj["Key"][len(prefix):]
                if leaf:  # "dir/" marker objects that some tools create
                    found.append(f"{subdir}/{leaf}" if subdir else leaf)
        return sorted(found)

    def list_dirs(self, subdir: str = "") -> _Names:
        prefix = self.key(subdir) + "/" if subdir else self._base
        found: list[str] = []
        for page in self._pages(prefix, "/"):
            found.extend(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(d for d in found if d)

    def exists(self, name: str) -> bool:
        if not name:
            for page in self._pages(self._base, None, max_keys=1):
                return bool(page.get("KeyCount", len(page.get("Contents", []))))
            return False
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except CheckpointError:
            raise
        except Exception as e:
            if _status(e) == 404:
                self._check_bucket(e)
                return False
            raise self._error(e, f"cannot look at {name} in") from e
        return True

    def delete(self, name: str) -> None:
        key = self.key(name)
        try:
            hit("delete")
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except CheckpointError:
            raise
        except Exception as e:
            raise self._error(e, f"cannot delete {name} in") from e
        with self._lock:
            self._meta.pop(name, None)

    def delete_tree(self) -> None:
        """Delete every object under the prefix, and abort the uploads still open there."""
        if not self._base:
            raise CheckpointIOError(f"{self.location}: refusing to delete a whole bucket")
        try:
            for page in self._pages(self._base, None):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    r = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    if r.get("Errors"):
                        first = r["Errors"][0]
                        raise CheckpointIOError(f"cannot delete {first.get('Key')} in {self.location}: "
                                                f"{first.get('Code')}: {first.get('Message')}")
        except CheckpointError:
            raise
        except Exception as e:
            raise self._error(e, "cannot remove") from e
        self.abort_uploads()

    def abort_uploads(self) -> int:
        """Abort every multipart upload open under the prefix. A step whose only trace is an open
        upload (its writer killed before any object completed) has no object, so listing never
        shows it as a step: without this, its parts would be stored, and paid for, forever."""
        aborted = 0
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._base):
                for up in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
        except CheckpointError:
            raise
        except Exception as e:
            if _code(e) == "NoSuchUpload":  # aborted meanwhile (or by a lifecycle rule): gone either way
                return aborted
            raise self._error(e, "cannot abort the uploads left open in") from e
        return aborted

    def fsync_dir(self, subdir: str = "", point: str = "dir_fsync") -> None:
        hit(point)  # nothing to sync: a completed PUT or upload is durable

    def fsync_parent(self) -> None:
        hit("data_dir_fsync")

    def publish(self, name: str, data: bytes) -> None:
        """One PUT: S3 replaces an object atomically, so readers see the old or the new bytes."""
        key = self.key(name)
        try:
            hit("index_write")
            hit("rename")  # the same place in the order as the local rename: nothing is visible yet
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except CheckpointError:
            raise
        except Exception as e:
            raise self._error(e, "cannot commit", name) from e
        with self._lock:
            self._meta.pop(name, None)

    def read_all(self, name: str, limit: int) -> bytes:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
            body = r["Body"]
            try:
                return bytes(body.read(limit + 1))
            finally:
                body.close()
        except CheckpointError:
            raise
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404"):
                raise CheckpointNotFoundError(f"{self.location}/{name} does not exist") from e
            raise self._error(e, f"cannot read {name} in") from e

    def lock(self, purpose: str) -> _SingleWriter:
        return _SingleWriter()

    def close(self) -> None:
        with self._lock:
            self._meta.clear()

    # --- helpers --------------------------------------------------------------------------------

    def _pages(self, prefix: str, delimiter: str | None, max_keys: int = 1000) -> _Pages:
        args: dict[str, object] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            args["Delimiter"] = delimiter
        pages = []
        try:
            while True:
                page = self.client.list_objects_v2(**args)  # type: ignore[arg-type]
                pages.append(page)
                if max_keys < 1000 or not page.get("IsTruncated"):
                    return pages  # type: ignore[return-value]
                args["ContinuationToken"] = page["NextContinuationToken"]
        except Exception as e:
            raise self._error(e, "cannot list") from e

    def _check_bucket(self, cause: BaseException) -> None:
        """A HEAD answers 404 with no code for a missing bucket and a missing key alike: ask."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            if _status(e) == 404:
                raise self._no_bucket() from cause
            raise self._error(e, "cannot use") from e

    def _no_bucket(self) -> BucketNotFoundError:
        return BucketNotFoundError(
            f"{self.location}: the bucket {self.bucket!r} does not exist at {self.client.meta.endpoint_url}; create "
            "it, or check the URL and AWS_ENDPOINT_URL"
        )

    def _error(self, e: BaseException, action: str, name: str = "") -> CheckpointIOError:
        """A client failure as the CheckpointError that says what to do."""
        where = f"{self.location}/{name}" if name else self.location
        code = _code(e)
        if code == "NoSuchBucket":
            return self._no_bucket()
        if code in _ACCESS_CODES or _status(e) == 403 or type(e).__name__ in ("NoCredentialsError",
                                                                                "PartialCredentialsError"):
            return StorageAccessError(
                f"{action} {where}: the store refused the request ({code or type(e).__name__}). Check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or S3Options) and the bucket's policy"
            )
        detail = f"{code}: {_message(e)}" if code else f"{type(e).__name__}: {e}"
        return CheckpointIOError(f"{action} {where}: {detail} (endpoint {self.client.meta.endpoint_url})")


def _response(e: BaseException) -> dict[str, dict[str, object]]:
    r = getattr(e, "response", None)
    return r if isinstance(r, dict) else {}


def _code(e: BaseException) -> str:
    return str(_response(e).get("Error", {}).get("Code", ""))


def _message(e: BaseException) -> str:
    return str(_response(e).get("Error", {}).get("Message", e))


def _status(e: BaseException) -> int | None:
    status = _response(e).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None
