"""From a path or URL to a backend: local paths and file:// are directories, s3:// is S3, any other
scheme is an error and never a directory. No server needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shardckpt.errors import UnsupportedStorageError
from shardckpt.storage import LocalStorage, open_storage, parse_location
from shardckpt.storage.s3_writer import part_at, part_span

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("where", "path"), [
    ("ckpt/step-1", Path("ckpt/step-1")), ("/mnt/ckpt", Path("/mnt/ckpt")), (Path("rel/x"), Path("rel/x")),
    ("file:///mnt/ckpt", Path("/mnt/ckpt")), ("file://localhost/mnt/c", Path("/mnt/c")), ("./run:1", Path("run:1")),
    ("/abs/run:1", Path("/abs/run:1")),
])
def test_local_locations(where, path):
    loc = parse_location(where)
    assert loc.scheme == "file" and loc.path == path
    storage = open_storage(where)
    assert isinstance(storage, LocalStorage) and storage.root == path


@pytest.mark.parametrize(("where", "bucket", "prefix"), [
    ("s3://bucket/run/step-1", "bucket", "run/step-1"), ("s3://bucket", "bucket", ""), ("s3://b.x-1/a/", "b.x-1", "a"),
    (Path("s3://bucket/run/step-1"), "bucket", "run/step-1"),  # pathlib collapsed the "//"
])
def test_s3_locations(where, bucket, prefix):
    loc = parse_location(where)
    assert (loc.scheme, loc.bucket, loc.prefix) == ("s3", bucket, prefix)
    assert loc.url == (f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")
    assert loc.join("step-2") == f"{loc.url}/step-2"


@pytest.mark.parametrize("where", [
    "gs://bucket/x", "hdfs://nn/x", "http://host/x", "s3:bucket", "s3://ab/x", "s3://Upper/x", "s3://bucket/a//b",
    "file://otherhost/x", "file:relative", "run:1/x",
])
def test_unsupported_locations_are_errors(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedStorageError, match=where.split("/")[0]):
        open_storage(where)
    assert list(tmp_path.iterdir()) == []


def test_local_paths_never_import_the_s3_client():
    import subprocess

    code = ("import sys, shardckpt; from shardckpt.storage import open_storage; open_storage('x/y'); "
            "shardckpt.committed_steps('nowhere'); print('boto3' in sys.modules or 'botocore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_part_layout_tiles_the_file():
    p = 5 << 20
    assert part_span(0, p) == (0, p) and part_span(999, p) == (999 * p, p)
    assert part_span(1000, p) == (1000 * p, 2 * p) and part_span(2000, p) == (3000 * p, 4 * p)
    end = 0
    for k in range(0, 10000, 7):
        start, size = part_span(k, p)
        assert part_at(start, p) == k and part_at(start + size - 1, p) == k
        if k:
            assert part_at(start - 1, p) == k - 1
        end = max(end, start + size)
    assert end > 4 << 40  # 10000 parts that start at 5 MiB reach past 4 TiB (16 MiB parts: 15 TiB)
