"""Durability details: what a failed or finished save may and may not touch."""

from __future__ import annotations

import os

import pytest
import torch

import shardckpt
from shardckpt.cli import main
from shardckpt.storage import faults

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_faults():
    yield
    faults.configure("")
    shardckpt.shutdown()


def _state(step: int) -> dict[str, object]:
    return {"w": torch.full((1000,), float(step)), "step": step}


def _files(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != ".shardckpt.lock"}


@pytest.mark.parametrize("bad", [{"tags": {1, 2}}, {"tags": {float("nan")}}, {"obj": object()}])
def test_metadata_that_cannot_be_stored_fails_before_any_file(tmp_path, bad):
    path = tmp_path / "ckpt"
    shardckpt.save(_state(1), path)
    before = _files(path)
    with pytest.raises(shardckpt.StateMismatchError, match="metadata"):
        shardckpt.save(_state(2), path, metadata=bad)
    assert _files(path) == before  # no orphan: the previous checkpoint still verifies clean
    assert shardckpt.verify(path).orphans == ()


def test_a_failing_cleanup_does_not_replace_the_real_error(tmp_path):
    # The data write fails (ENOSPC), and so does deleting the partial file afterwards.
    faults.configure("write:2:enospc,delete:1:eio")
    with pytest.raises(shardckpt.CheckpointIOError, match="No space left on device"):
        shardckpt.save(_state(1), tmp_path / "ckpt")


def test_convert_never_overwrites_its_source_or_a_checkpoint_unasked(tmp_path, capsys):
    src = tmp_path / "src"
    shardckpt.save(_state(1), src)
    other = tmp_path / "other"
    shardckpt.save(_state(2), other)
    before_src, before_other = _files(src), _files(other)
    assert main(["convert", str(src), str(src)]) == 2  # in place
    assert main(["convert", str(src), str(src / "data")]) == 2  # into its own data/
    assert main(["convert", str(src), str(other)]) == 2  # over another checkpoint
    err = capsys.readouterr().err
    assert "is, or is inside, the source" in err and "--overwrite" in err
    assert _files(src) == before_src and _files(other) == before_other
    assert main(["convert", str(src), str(other), "--overwrite", "--compression", "none"]) == 0
    got = _state(0)
    shardckpt.load(got, other)
    assert got["step"] == 1


def test_verify_reports_orphans_with_exit_code_3(tmp_path, capsys):
    path = tmp_path / "ckpt"
    shardckpt.save(_state(1), path)
    assert main(["verify", str(path)]) == 0
    (path / "data" / "0123456789abcdef-r00001.bin").write_bytes(b"left by a crashed save")
    assert main(["verify", str(path)]) == 3
    out = capsys.readouterr().out
    assert "warn" in out and "0123456789abcdef-r00001.bin" in out
    assert os.path.exists(path / "data" / "0123456789abcdef-r00001.bin")


def test_the_root_and_step_directory_are_fsynced_before_the_index_is_published(tmp_path, monkeypatch):
    # A new step directory's entry lives in the manager root: without an fsync of the root before
    # the commit, a power loss could drop the whole step after the save returned.
    root = tmp_path / "root"
    index = root / "step-00000001" / "index.json"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), index.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    m = shardckpt.CheckpointManager(root, async_save=False)
    m.save(1, _state(1))
    m.close()
    before_commit = {path for path, published in synced if not published}
    assert str(root) in before_commit and str(root / "step-00000001") in before_commit
    assert (str(root / "step-00000001"), True) in synced  # and the rename itself, after it
    # The root did not exist: its own entry, in tmp_path, is made durable too (and nothing higher,
    # which existed already).
    assert str(tmp_path) in before_commit and str(tmp_path.parent) not in {p for p, _ in synced}


def test_every_directory_a_save_creates_has_a_durable_entry_before_the_commit(tmp_path, monkeypatch):
    path = tmp_path / "a" / "b" / "ckpt"  # a, b and ckpt are all new
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (path / "index.json").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    shardckpt.save(_state(1), path)
    before_commit = {p for p, published in synced if not published}
    assert {str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")} <= before_commit
