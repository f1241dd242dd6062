"""A real full disk: a size-limited tmpfs mounted for the test (as root; skipped with the reason
otherwise). ENOSPC while writing data, while writing the index, and a manager whose retention must
make room on a disk that holds exactly two checkpoints. (EIO comes by injection: the fault matrix.)"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

import shardckpt

pytestmark = pytest.mark.timeout(120)
RAW = shardckpt.CompressionOptions(codec="none")
PAGE = 4096


def _state(step: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64 * 1024, generator=g), "step": step}  # 256 KiB of float32


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


@pytest.fixture
def small_disk(tmp_path):
    """A function that mounts a tmpfs of the given size at a fresh directory and returns it."""
    mounted = []

    def mount(size: int):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(disk, leave: int) -> None:
    """Take all free space but ``leave`` bytes (page-rounded) with a filler file."""
    free = _free(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (free - _pages(leave)))
    assert _free(disk) == _pages(leave)


def _loads_as(path, step: int) -> None:
    got = {"w": torch.zeros(64 * 1024), "step": -1}
    shardckpt.load(got, path)
    assert got["step"] == step and torch.equal(got["w"], _state(step)["w"])  # type: ignore[arg-type]


def _data_size(tmp_path) -> int:
    probe = tmp_path / "probe"
    shardckpt.save(_state(1), probe, compression=RAW)
    return shardckpt.read_index(probe).files[0].size


def test_enospc_while_writing_data_keeps_the_previous_checkpoint(tmp_path, small_disk):
    size = _data_size(tmp_path)
    disk = small_disk(16 << 20)
    path = disk / "ckpt"
    shardckpt.save(_state(1), path, compression=RAW)
    _fill(disk, size // 2)  # half a data file fits
    with pytest.raises(shardckpt.CheckpointIOError, match="No space left on device"):
        shardckpt.save(_state(2), path, compression=RAW)
    assert shardckpt.verify(path).orphans == ()  # the partial data file is gone
    _loads_as(path, 1)
    (disk / "filler").unlink()
    shardckpt.save(_state(2), path, compression=RAW)
    _loads_as(path, 2)


def test_enospc_while_writing_the_index_keeps_the_previous_checkpoint(tmp_path, small_disk):
    size = _data_size(tmp_path)
    disk = small_disk(16 << 20)
    path = disk / "ckpt"
    shardckpt.save(_state(1), path, compression=RAW)
    _fill(disk, size)  # exactly the new data file fits; the new index does not
    with pytest.raises(shardckpt.CheckpointIOError, match="cannot commit .*index.json: No space left on device"):
        shardckpt.save(_state(2), path, compression=RAW)
    report = shardckpt.verify(path)
    assert report.orphans == ()
    assert not [n for n in os.listdir(path) if n.startswith(".index.json.tmp")]  # no temp index left behind
    _loads_as(path, 1)


@pytest.mark.parametrize("use_async", [True, False])
def test_manager_retention_makes_room_on_a_disk_for_two_checkpoints(tmp_path, small_disk, use_async):
    size = _data_size(tmp_path)
    # Room for two checkpoints' data plus their small index and lock files, not for three.
    disk = small_disk(2 * _pages(size) + 16 * PAGE)
    m = shardckpt.CheckpointManager(disk / "root", keep_last=1, async_save=use_async, compression=RAW)
    for step in range(1, 9):
        m.save(step, _state(step))
        m.wait()  # each save commits: retention drops the older step before the next one writes
    m.close()
    assert m.steps() == [8]
    _loads_as(m.path_for(8), 8)


def test_manager_on_a_disk_for_one_checkpoint_fails_saves_and_keeps_the_newest(tmp_path, small_disk):
    size = _data_size(tmp_path)
    disk = small_disk(_pages(size) + 16 * PAGE)
    m = shardckpt.CheckpointManager(disk / "root", keep_last=1, async_save=False, compression=RAW)
    m.save(1, _state(1))
    for step in (2, 3):  # the newest committed step is never deleted to make room
        with pytest.raises(shardckpt.CheckpointIOError, match="No space left on device"):
            m.save(step, _state(step))
    m.close()
    assert m.steps() == [1] and shardckpt.verify(m.path_for(1)).orphans == ()
    assert [d for d in os.listdir(disk / "root") if d.startswith("step-")] == ["step-00000001"]  # torn ones collected
    _loads_as(m.path_for(1), 1)
