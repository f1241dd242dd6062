"""Every path on an s3:// URL against a real moto server on 127.0.0.1: save at N ranks and load at
M, verify, the manager with retention, the CLI, the server killed mid-upload, and the errors a
user meets first (wrong credentials, a missing bucket, a scheme with no backend)."""

from __future__ import annotations

import os
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import cli
from shardckpt.errors import BucketNotFoundError, CheckpointIOError, StorageAccessError, UnsupportedStorageError
from shardckpt.storage import open_storage
from tests.backends import MotoS3, free_port, start_server
from tests.dist.harness import run_ranks
from tests.dist.test_reshard import SMALL_BLOCKS, load_worker, save_worker

pytestmark = pytest.mark.timeout(240)


def _state(seed: int, n: int = 5000) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.arange(10, dtype=torch.int64) * seed, "step": seed}


def _loads_as(path: str, seed: int) -> None:
    got: dict[str, object] = {"w": torch.zeros(5000), "b": torch.zeros(10, dtype=torch.int64), "step": -1}
    shardckpt.load(got, path)
    want = _state(seed)
    assert got["step"] == seed and torch.equal(got["w"], want["w"]) and torch.equal(got["b"], want["b"])  # type: ignore[arg-type]


def _keys(s3: MotoS3, prefix: str) -> list[str]:
    r = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1:] for o in r.get("Contents", []))


def test_save_load_verify_on_s3(s3_env: MotoS3, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    url = s3_env.url(s3_prefix, "ckpt")
    result = shardckpt.save(_state(3), url)
    assert result.path == url
    keys = _keys(s3_env, f"{s3_prefix}/ckpt")
    assert "index.json" in keys and any(k.startswith("data/") for k in keys)
    assert list(tmp_path.iterdir()) == []  # nothing was written locally
    _loads_as(url, 3)
    report = shardckpt.verify(url)
    assert report.tensors == 2 and report.orphans == ()
    # A second save into the same URL replaces it; the first save's data object is removed.
    shardckpt.save(_state(4), url)
    _loads_as(url, 4)
    assert len([k for k in _keys(s3_env, f"{s3_prefix}/ckpt") if k.startswith("data/")]) == 1
    # Corrupt a block: verify and load see it.
    name = shardckpt.read_index(url).files[0].name
    key = f"{s3_prefix}/ckpt/{name}"
    body = bytearray(s3_env.client().get_object(Bucket=s3_env.bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=key, Body=bytes(body))
    with pytest.raises(shardckpt.CorruptCheckpointError, match="checksum mismatch"):
        shardckpt.verify(url)


def test_async_save_on_s3(s3_env: MotoS3, s3_prefix: str):
    url = s3_env.url(s3_prefix, "async")
    shardckpt.async_save(_state(5), url).wait(timeout=60)
    _loads_as(url, 5)


def test_a_scheme_with_no_backend_is_an_error_never_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    for url in ("gs://bucket/run1/step-5", "hdfs://nn/x", "s3:bucket-without-slashes"):
        with pytest.raises(UnsupportedStorageError, match="gs|hdfs|s3"):
            shardckpt.save(_state(1), url)
        with pytest.raises(UnsupportedStorageError):
            shardckpt.load(_state(1), url)
    with pytest.raises(UnsupportedStorageError, match="not a valid bucket name"):
        shardckpt.save(_state(1), "s3://ab/x")
    with pytest.raises(UnsupportedStorageError):
        shardckpt.CheckpointManager("gs://bucket/run")
    assert list(tmp_path.iterdir()) == []  # no "gs:" or "s3:" directory appeared


def test_wrong_credentials_name_the_url(s3_auth: MotoS3, s3_env: MotoS3, s3_prefix: str,
                                        monkeypatch: pytest.MonkeyPatch):
    url = s3_env.url(s3_prefix, "ckpt")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
    with pytest.raises(StorageAccessError, match=f"{url}.*refused.*AWS_ACCESS_KEY_ID"):
        shardckpt.save(_state(1), url)
    with pytest.raises(StorageAccessError, match=url):
        shardckpt.load(_state(1), url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageAccessError, match=f"{url}.*refused"):
        shardckpt.save(_state(1), url)


def test_a_missing_profile_is_a_checkpoint_error_naming_the_url(monkeypatch: pytest.MonkeyPatch):
    url = "s3://some-bucket/run/step-1"
    for options, env in ((shardckpt.S3Options(profile="no-such-profile"), None), (None, "no-such-profile")):
        if env:
            monkeypatch.setenv("AWS_PROFILE", env)
        for action in (partial(shardckpt.load, _state(1), url, s3=options),
                       partial(shardckpt.committed_steps, "s3://some-bucket/run", s3=options),
                       partial(shardckpt.CheckpointManager, "s3://some-bucket/run", s3=options)):
            with pytest.raises(CheckpointIOError, match=f"{url.rsplit('/', 2)[0]}.*ProfileNotFound.*no-such-profile"):
                action()


def test_missing_bucket_names_the_url_and_bucket(s3_env: MotoS3):
    url = "s3://no-such-bucket-here/run/step-1"
    for action in (lambda: shardckpt.save(_state(1), url), lambda: shardckpt.load(_state(1), url),
                   lambda: shardckpt.verify(url), lambda: shardckpt.committed_steps("s3://no-such-bucket-here/run")):
        with pytest.raises(BucketNotFoundError, match="s3://no-such-bucket-here.*'no-such-bucket-here' does not exist"):
            action()


def test_manager_retention_restore_and_torn_steps_on_s3(s3_env: MotoS3, s3_prefix: str):
    root = s3_env.url(s3_prefix, "run")
    # A torn save left by a crash: data but no index. Never listed, removed by the next save.
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=f"{s3_prefix}/run/step-00000007/data/x-r00000.bin", Body=b"x")
    m = shardckpt.CheckpointManager(root, keep_last=2)  # async saves, as by default
    assert m.steps() == [] and m.restore(_state(0)) is None
    for step in (1, 2, 3, 4):
        m.save(step, _state(step))
    m.close()
    assert m.steps() == [3, 4] and shardckpt.committed_steps(root) == [3, 4]
    assert m.path_for(4) == f"{root}/step-00000004"
    dirs = open_storage(root).list_dirs()
    assert dirs == ["step-00000003", "step-00000004"], dirs  # steps 1, 2 and the torn 7 are gone
    got = _state(0)
    got["w"], got["b"] = torch.zeros(5000), torch.zeros(10, dtype=torch.int64)
    assert shardckpt.CheckpointManager(root).restore(got) == 4
    assert torch.equal(got["w"], _state(4)["w"])  # type: ignore[arg-type]
    # The CLI over the same URLs.
    assert cli.main(["ls", root]) == 0
    assert cli.main(["inspect", f"{root}/step-00000004"]) == 0
    assert cli.main(["verify", f"{root}/step-00000003", f"{root}/step-00000004"]) == 0
    assert cli.main(["verify", f"{root}/step-00000001"]) == 1


def test_cli_output_on_s3(s3_env: MotoS3, s3_prefix: str, capsys: pytest.CaptureFixture[str]):
    root = s3_env.url(s3_prefix, "run")
    shardckpt.save(_state(2), f"{root}/step-00000002")
    assert cli.main(["ls", root]) == 0
    assert "step          2" in capsys.readouterr().out
    assert cli.main(["verify", f"{root}/step-00000002"]) == 0
    assert capsys.readouterr().out.startswith(f"ok   {root}/step-00000002")
    assert cli.main(["verify", "gs://x/y"]) == 1
    assert "FAIL gs://x/y: UnsupportedStorageError" in capsys.readouterr().out


def test_server_killed_mid_upload(moto_s3: MotoS3, s3_prefix: str, monkeypatch: pytest.MonkeyPatch):
    # A server of our own on another port (same in-process store, so it comes back with its data).
    port = free_port()
    server = start_server(port)
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {**moto_s3.env(), "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
    root = moto_s3.url(s3_prefix, "run")
    m = shardckpt.CheckpointManager(root, async_save=False)
    m.save(1, _state(1))
    big = {"w": torch.randn(24 << 20 >> 2), "step": 2}  # 96 MiB: several 16 MiB parts
    uploads = moto_s3.client()  # through the session's server, which stays up
    killed = threading.Event()

    def kill_when_uploading() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = uploads.list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=f"{s3_prefix}/run/step-00000002/")
            if r.get("Uploads"):
                server.stop()
                killed.set()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_when_uploading)
    watcher.start()
    try:
        with pytest.raises(CheckpointIOError):
            m.save(2, big, force=True)
    finally:
        watcher.join()
    assert killed.is_set(), "the save finished before the server could be stopped"
    server = start_server(port)  # back up, with the store as it was
    try:
        assert m.steps() == [1]
        assert shardckpt.committed_steps(root) == [1]
        _loads_as(m.path_for(1), 1)  # type: ignore[arg-type]
        m.save(3, _state(3))
        m.close()
        assert m.steps() == [1, 3]
        assert "step-00000002" not in open_storage(root).list_dirs()
        for step in m.steps():
            assert shardckpt.verify(m.path_for(step)).tensors >= 1
        left = uploads.list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=f"{s3_prefix}/run/")
        assert not left.get("Uploads"), "the killed save's upload was left open"
    finally:
        server.stop()


def _save_ranks(rank: int, world_size: int, env: dict[str, str], path: str) -> int:
    os.environ.update(env)
    return save_worker(rank, world_size, path, SMALL_BLOCKS)


def _load_ranks(rank: int, world_size: int, env: dict[str, str], paths: list[str]) -> list[str]:
    os.environ.update(env)
    return load_worker(rank, world_size, paths)


def test_save_at_n_ranks_load_at_m_on_s3(s3_env: MotoS3, s3_prefix: str):
    moto_s3 = s3_env
    env = moto_s3.env()
    url = moto_s3.url(s3_prefix, "resharded")
    written = run_ranks(2, _save_ranks, env, url)
    assert all(w > 0 for w in written)
    index = open_storage(url)
    assert index.exists("index.json") and len(index.list("data")) == 2
    for m in (1, 3):
        assert run_ranks(m, _load_ranks, env, [url]) == [[] for _ in range(m)], f"save at 2, load at {m}"


def test_keyword_overrides_reach_every_path(moto_s3: MotoS3, s3_prefix: str, monkeypatch: pytest.MonkeyPatch):
    # The environment points at a closed port with made-up keys: only the s3= overrides can work.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    opts = shardckpt.S3Options(endpoint_url=moto_s3.endpoint, access_key_id=moto_s3.key,
                               secret_access_key=moto_s3.secret, max_attempts=1, connect_timeout=2.0)
    url = moto_s3.url(s3_prefix, "ckpt")
    state = {"w": torch.arange(40, dtype=torch.float32).reshape(8, 5), "step": 3}
    shardckpt.save(state, url, s3=opts)
    got = {"w": torch.zeros(8, 5), "step": 0}
    shardckpt.load(got, url, s3=opts)
    assert torch.equal(got["w"], state["w"]) and got["step"] == 3
    assert shardckpt.verify(url, s3=opts).tensors == 1
    assert torch.equal(shardckpt.load_all(url, s3=opts)["w"], state["w"])  # type: ignore[arg-type]
    shardckpt.async_save(state, moto_s3.url(s3_prefix, "async"), s3=opts).wait(timeout=60)
    assert shardckpt.read_index(moto_s3.url(s3_prefix, "async"), s3=opts).tensors[0].key == "w"

    root = moto_s3.url(s3_prefix, "run")
    manager = shardckpt.CheckpointManager(root, keep_last=2, s3=opts)
    for step in (1, 2, 3):
        manager.save(step, {"w": state["w"] + step})
    manager.wait()
    target = {"w": torch.zeros(8, 5)}
    assert manager.restore(target) == 3 and torch.equal(target["w"], state["w"] + 3)
    manager.close()  # retention runs at the next save and in close()
    assert shardckpt.committed_steps(root, s3=opts) == [2, 3]


def test_one_client_per_configuration(s3_env: MotoS3, s3_prefix: str, monkeypatch: pytest.MonkeyPatch):
    # Building a boto3 client parses its service models (0.1-0.7 s of CPU): it used to be paid by
    # every open_storage, several times a save and once per step a restore checks.
    first = open_storage(s3_env.url(s3_prefix, "a"))
    assert open_storage(s3_env.url(s3_prefix, "b")).client is first.client  # type: ignore[attr-defined]
    # ... but a changed environment or other options are honoured at once, never served stale.
    other = shardckpt.S3Options(max_attempts=1)
    assert open_storage(s3_env.url(s3_prefix, "a"), s3=other).client is not first.client  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert open_storage(s3_env.url(s3_prefix, "a")).client is not first.client  # type: ignore[attr-defined]


def test_uploads_of_a_killed_save_are_aborted_by_the_next_saving_manager(s3_env: MotoS3, s3_prefix: str):
    # A rank killed before any part completed leaves only an open multipart upload: no object, so
    # no step is listed, yet the store keeps (and bills) its parts until it is aborted.
    root = s3_env.url(s3_prefix, "run")
    client = s3_env.client()
    m = shardckpt.CheckpointManager(root, async_save=False)
    m.save(1, _state(1))
    m.close()
    key = f"{s3_prefix}/run/step-00000002/data/0123456789abcdef-r00001.bin"
    upload = client.create_multipart_upload(Bucket=s3_env.bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=s3_env.bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)

    def open_uploads() -> list[str]:
        r = client.list_multipart_uploads(Bucket=s3_env.bucket, Prefix=f"{s3_prefix}/run/")
        return [u["UploadId"] for u in r.get("Uploads", [])]

    reader = shardckpt.CheckpointManager(root, keep_last=1)
    assert reader.steps() == [1] and reader.restore(_state(0)) == 1
    reader.close()
    assert open_uploads() == [upload]  # read-only calls abort nothing
    m2 = shardckpt.CheckpointManager(root, async_save=False)
    m2.save(2, _state(2))  # its garbage collection runs first
    m2.close()
    assert open_uploads() == [] and m2.steps() == [1, 2]
    _loads_as(m2.path_for(2), 2)  # type: ignore[arg-type]
