"""Both storage backends for the tests: a real S3 server (moto's ThreadedMotoServer on 127.0.0.1, a
free port, with a bucket, a user who may do everything and one who may only read), and the
``place`` fixture that runs one test on a local directory and on a fresh ``s3://`` prefix.

Nothing is mocked: the client talks HTTP to the server. Authentication is on only in tests that
ask for ``s3_auth``: moto 5.2 computes a wrong signature for a query string holding an encoded
``/`` (so every ListObjectsV2 with a prefix like ``run/step-1/`` fails with SignatureDoesNotMatch
while it is on), and listing is what the manager and cleanup do. With it on, the server checks
access keys, signatures and IAM policies, as a real store does.

A test folder gets these fixtures by importing them into its conftest.py. pytest caches a fixture
per place it is defined, so each importing conftest has its own session fixture; they all share
one server per process (moto's store is process-wide state anyway).
"""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BUCKET = "shardckpt-test"
REGION = "us-east-1"
LOCK_NAME = ".shardckpt.lock"  # the local backend's flock file: not part of a checkpoint


@dataclass
class MotoS3:
    endpoint: str
    port: int
    bucket: str
    key: str  # the writer's credentials
    secret: str
    ro_key: str  # a user allowed GetObject and ListBucket only
    ro_secret: str

    def env(self) -> dict[str, str]:
        """The standard AWS environment that points at this server as the writer."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": REGION}

    def url(self, *parts: str) -> str:
        return "/".join((f"s3://{self.bucket}", *parts))

    def client(self, endpoint: str | None = None) -> Any:  # a plain boto3 client, for the tests' own checks
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=REGION)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> Any:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@dataclass
class _Shared:
    server: Any = None
    s3: MotoS3 | None = None
    users: int = 0


# One server per process, however many conftests import the fixture: moto keeps its store in
# process-wide state, so a second server would share it (and setting up its users again fails).
_SHARED = _Shared()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    if _SHARED.s3 is None:
        _SHARED.server, _SHARED.s3 = _start_moto()
    _SHARED.users += 1
    try:
        yield _SHARED.s3
    finally:
        _SHARED.users -= 1
        if _SHARED.users == 0:
            _SHARED.server.stop()
            _SHARED.server, _SHARED.s3 = None, None


def _start_moto() -> tuple[Any, MotoS3]:
    import boto3

    port = free_port()
    server = start_server(port)
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                       region_name=REGION)
    keys = {}
    for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                 region_name=REGION).create_bucket(Bucket=BUCKET)
    return server, MotoS3(endpoint, port, BUCKET, *keys["writer"], *keys["reader"])


def _set_auth(endpoint: str, unauthenticated_requests: str) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=unauthenticated_requests.encode(),
                                 method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture
def s3_auth(moto_s3: MotoS3) -> Iterator[MotoS3]:
    """Every request of this test is authenticated and authorized (keys, signature, IAM policy)."""
    _set_auth(moto_s3.endpoint, "0")
    try:
        yield moto_s3
    finally:
        _set_auth(moto_s3.endpoint, "inf")


@pytest.fixture
def s3_env(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> MotoS3:
    """The AWS environment of this process points at the server (as the writer)."""
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_s3


@pytest.fixture
def s3_prefix() -> str:
    """A prefix no other test uses (the server and bucket are shared by the session)."""
    return f"t-{uuid.uuid4().hex[:12]}"


class Place:
    """A fresh checkpoint location on one backend, and raw access to what is stored there, to
    damage and inspect it as a crash, a bad disk or a person would (never through shardckpt).

    Names are relative to ``root`` and ``/``-separated (``step-00000003/data/x.bin``)."""

    def __init__(self, kind: str, root: Path | str, s3: MotoS3 | None = None, prefix: str = "") -> None:
        self.kind = kind
        self.root = root  # what a user passes: a Path, or an s3:// URL
        self.s3 = s3
        self._prefix = prefix  # the key prefix of root (S3)
        self.env: dict[str, str] = s3.env() if s3 is not None else {}  # for processes a test starts

    def __repr__(self) -> str:
        return f"Place({self.kind}, {self.root})"

    def at(self, *parts: str) -> Any:
        """The location of ``parts`` under the root, as a user would write it (Path or URL)."""
        if isinstance(self.root, Path):
            return self.root.joinpath(*parts)
        return "/".join((self.root, *parts))

    def files(self, under: str = "") -> list[str]:
        """Every file (object) under ``under``, relative to the root, sorted; lock files left out."""
        if isinstance(self.root, Path):
            base = self.root / under if under else self.root
            found = [str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()] if base.is_dir() else []
            return sorted(n for n in found if Path(n).name != LOCK_NAME)
        prefix = f"{self._prefix}/{under}/" if under else f"{self._prefix}/"
        return sorted(o["Key"][len(self._prefix) + 1:] for o in self._objects(prefix))

    def step_dirs(self, under: str = "") -> list[str]:
        """The ``step-*`` entries directly under ``under``: local directories (empty ones too), or
        the prefixes that hold an object."""
        if isinstance(self.root, Path):
            base = self.root / under if under else self.root
            return sorted(p.name for p in base.iterdir() if p.name.startswith("step-")) if base.is_dir() else []
        depth = len(under.split("/")) if under else 0
        return sorted({n.split("/")[depth] for n in self.files(under) if n.split("/")[depth].startswith("step-")})

    def read(self, name: str) -> bytes:
        if isinstance(self.root, Path):
            return (self.root / name).read_bytes()
        return bytes(self._client().get_object(Bucket=self._bucket, Key=self._key(name))["Body"].read())

    def write(self, name: str, data: bytes) -> None:
        if isinstance(self.root, Path):
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            (self.root / name).write_bytes(data)
        else:
            self._client().put_object(Bucket=self._bucket, Key=self._key(name), Body=data)

    def delete(self, name: str) -> None:
        if isinstance(self.root, Path):
            (self.root / name).unlink()
        else:
            self._client().delete_object(Bucket=self._bucket, Key=self._key(name))

    def exists(self, name: str) -> bool:
        return name in self.files(name.rpartition("/")[0])

    def truncate(self, name: str, drop: int) -> None:
        """Cut the last ``drop`` bytes off ``name``."""
        self.write(name, self.read(name)[:-drop])

    def flip(self, name: str, offset: int | None = None) -> None:
        """Flip every bit of one byte of ``name`` (the middle one unless ``offset``): same size."""
        raw = bytearray(self.read(name))
        raw[len(raw) // 2 if offset is None else offset] ^= 0xFF
        self.write(name, bytes(raw))

    def contents(self, under: str = "") -> dict[str, bytes]:
        """Every file (object) under ``under`` with its bytes (lock files left out)."""
        return {name: self.read(name) for name in self.files(under)}

    def snapshot(self) -> dict[str, object]:
        """Everything stored under the root, with what would show a change (local: every entry's
        mtime, size and bytes; S3: every object's ETag, modification time and bytes, and the
        multipart uploads open there). Equal snapshots: nothing was written or deleted."""
        if isinstance(self.root, Path):
            out: dict[str, object] = {}
            for p in sorted(self.root.rglob("*")):
                st = p.lstat()
                out[str(p.relative_to(self.root))] = (st.st_mtime_ns, st.st_size, p.read_bytes() if p.is_file() else b"")
            return out
        out = {o["Key"]: (o["ETag"], o["LastModified"], self.read(o["Key"][len(self._prefix) + 1:]))
               for o in self._objects(f"{self._prefix}/")}
        uploads = self._client().list_multipart_uploads(Bucket=self._bucket, Prefix=f"{self._prefix}/")
        out["<uploads>"] = sorted((u["Key"], u["UploadId"]) for u in uploads.get("Uploads", []))
        return out

    # --- S3 ---------------------------------------------------------------------------------------

    @property
    def _bucket(self) -> str:
        assert self.s3 is not None
        return self.s3.bucket

    def _client(self) -> Any:
        assert self.s3 is not None
        return self.s3.client()

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    def _objects(self, prefix: str) -> list[dict[str, Any]]:
        pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=prefix)
        return [o for page in pages for o in page.get("Contents", [])]


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    """A fresh, empty location: a directory under tmp_path, or a new prefix on the moto server (the
    AWS environment of this process then points at the server, so the library and the CLI find it)."""
    if request.param == "local":
        return Place("local", tmp_path / "loc")
    s3: MotoS3 = request.getfixturevalue("s3_env")
    prefix = f"{request.getfixturevalue('s3_prefix')}/loc"
    return Place("s3", s3.url(prefix), s3, prefix)
