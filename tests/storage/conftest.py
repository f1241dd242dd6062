"""A real S3 server for the storage tests: moto's ThreadedMotoServer on 127.0.0.1 (a free port),
with a bucket, a user who may do everything and one who may only read.

Nothing is mocked: the client talks HTTP to the server. Authentication is on only in tests that
ask for ``s3_auth``: moto 5.2 computes a wrong signature for a query string holding an encoded
``/`` (so every ListObjectsV2 with a prefix like ``run/step-1/`` fails with SignatureDoesNotMatch
while it is on), and listing is what the manager and cleanup do. With it on, the server checks
access keys, signatures and IAM policies, as a real store does.
"""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

BUCKET = "shardckpt-test"
REGION = "us-east-1"


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

    def client(self, endpoint: str | None = None):  # a plain boto3 client, for the tests' own checks
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=REGION)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
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
    try:
        yield MotoS3(endpoint, port, BUCKET, *keys["writer"], *keys["reader"])
    finally:
        server.stop()


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
