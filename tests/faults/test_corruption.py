"""Damaged, incomplete and mismatching checkpoints, and saves that fail midway (single process,
plus one 2-rank save for swapped data files). Every failure is a specific CheckpointError that
names the checkpoint path (and the tensor key where one is to blame)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import (
    CheckpointIOError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MissingKeysError,
    StateMismatchError,
)
from shardckpt.storage import faults
from shardckpt.storage.lock import LOCK_NAME
from tests.dist.harness import run_ranks
from tests.stateful import Holder

pytestmark = pytest.mark.timeout(120)

BLOCKS = shardckpt.CompressionOptions(block_bytes=16 << 10)




def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(256, 64, generator=g),  # 64 KiB of float32: four 16 KiB blocks
        "emb": (torch.randn(100, 48, generator=g) * 0.02).to(torch.bfloat16),
        "ids": torch.randint(0, 1000, (500,), generator=g),
        "mask": torch.rand(7, 9, generator=g) > 0.5,
    }


def _state(seed: int = 0) -> dict[str, object]:
    return {**_tensors(seed), "step": 100 + seed, "cfg": {"lr": 3e-4, "betas": (0.9, 0.95)},
            "opt": Holder({"state": {0: {"step": seed}}, "groups": [{"lr": 0.1}]})}


def _target() -> dict[str, object]:
    target: dict[str, object] = {k: torch.zeros_like(v) for k, v in _tensors().items()}
    target.update(step=0, cfg=None, opt=Holder({"state": {}, "groups": [{"lr": 0.0}]}))
    return target


def _assert_loaded(target: dict[str, object], seed: int = 0) -> None:
    for key, want in _tensors(seed).items():
        got = target[key]
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{key} is not bit-exact"
    assert target["step"] == 100 + seed
    assert target["cfg"] == {"lr": 3e-4, "betas": (0.9, 0.95)}
    opt = target["opt"]
    assert isinstance(opt, Holder) and opt.state == {"state": {0: {"step": seed}}, "groups": [{"lr": 0.1}]}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "ckpt"
    shardckpt.save(_state(), path, compression=BLOCKS)
    return path


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(pristine, path)
    return path


def _data_file(path: Path) -> Path:
    (name,) = [f.name for f in shardckpt.read_index(path).files]
    return path / name


def _raises(kind, call, *needles: str):
    with pytest.raises(kind) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {type(info.value).__name__}: {info.value}"
    return info.value


def _load(path: Path, **kwargs) -> dict[str, object]:
    target = _target()
    shardckpt.load(target, path, **kwargs)
    return target


def test_pristine_loads_and_verifies(ckpt):
    report = shardckpt.verify(ckpt)
    assert report.tensors == 4 and report.blocks >= 5
    _assert_loaded(_load(ckpt))


# --- missing and incomplete ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["missing", "empty", "data-only", "index-deleted"])
def test_no_checkpoint(ckpt, tmp_path, layout):
    path = tmp_path / "other"
    if layout == "empty":
        path.mkdir()
    elif layout == "data-only":  # a save that wrote its data and never committed
        path.mkdir()
        shutil.copytree(ckpt / "data", path / "data")
    elif layout == "index-deleted":
        path = ckpt
        (path / "index.json").unlink()
    for call in (lambda: shardckpt.read_index(path), lambda: shardckpt.verify(path), lambda: _load(path)):
        _raises(CheckpointNotFoundError, call, str(path))


def test_path_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x")
    for call in (lambda: shardckpt.read_index(path), lambda: shardckpt.verify(path), lambda: _load(path)):
        _raises(CheckpointNotFoundError, call, str(path))


def test_missing_data_file(ckpt):
    data = _data_file(ckpt)
    data.unlink()
    for call in (lambda: shardckpt.verify(ckpt), lambda: _load(ckpt)):
        _raises(IncompleteCheckpointError, call, str(data))


@pytest.mark.parametrize("keep", [0, 10, 64, 100, -1])
def test_truncated_data_file(ckpt, keep):
    data = _data_file(ckpt)
    raw = data.read_bytes()
    data.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    for call in (lambda: shardckpt.verify(ckpt), lambda: _load(ckpt)):
        _raises(CorruptCheckpointError, call, str(ckpt), data.name, "truncated")


@pytest.mark.parametrize("extra", [b"\0", b"x" * 4096])
def test_data_file_with_appended_bytes(ckpt, extra):
    data = _data_file(ckpt)
    with open(data, "ab") as f:
        f.write(extra)
    for call in (lambda: shardckpt.verify(ckpt), lambda: _load(ckpt)):
        _raises(CorruptCheckpointError, call, str(ckpt), data.name, "extra bytes")


def test_data_file_replaced_by_a_directory(ckpt):
    data = _data_file(ckpt)
    data.unlink()
    data.mkdir()
    for call in (lambda: shardckpt.verify(ckpt), lambda: _load(ckpt)):
        _raises(shardckpt.CheckpointError, call, str(ckpt))


def test_stale_data_file_from_another_save(tmp_path):
    """Same state, same sizes, different save: the header tells the files apart."""
    a, b = tmp_path / "a", tmp_path / "b"
    shardckpt.save(_state(), a, compression="none")
    shardckpt.save(_state(), b, compression="none")
    data_a, data_b = _data_file(a), _data_file(b)
    assert data_a.stat().st_size == data_b.stat().st_size
    shutil.copyfile(data_a, data_b)
    for call in (lambda: shardckpt.verify(b), lambda: _load(b)):
        _raises(CorruptCheckpointError, call, str(b), data_b.name, "swapped or stale")


def test_index_from_another_checkpoint(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shardckpt.save(_state(), a, compression=BLOCKS)
    shardckpt.save(_state(1), b, compression=BLOCKS)
    shutil.copyfile(a / "index.json", b / "index.json")
    for call in (lambda: shardckpt.verify(b), lambda: _load(b)):
        _raises(IncompleteCheckpointError, call, str(b))


# --- swapped files of a 2-rank save -------------------------------------------------------------


def save_per_rank_worker(rank: int, world_size: int, path: str, lengths: list[int]) -> str:
    x = torch.arange(lengths[rank], dtype=torch.float32) + 1000 * rank
    shardckpt.save({"x": shardckpt.PerRank(x)}, path, compression="none")
    return path


@pytest.fixture(scope="module")
def two_rank_saves(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two-rank")
    paths = {"equal": root / "equal", "unequal": root / "unequal"}
    run_ranks(2, save_per_rank_worker, str(paths["equal"]), [1000, 1000], timeout=90)
    run_ranks(2, save_per_rank_worker, str(paths["unequal"]), [1000, 3000], timeout=90)
    return paths


def _swap(path: Path) -> tuple[Path, Path]:
    f0, f1 = (path / f.name for f in shardckpt.read_index(path).files)
    tmp = f0.with_name("swap.tmp")
    f0.rename(tmp)
    f1.rename(f0)
    tmp.rename(f1)
    return f0, f1


def _check_swapped(path: Path) -> None:
    f0, _ = _swap(path)
    _raises(CorruptCheckpointError, lambda: shardckpt.verify(path), str(path), "swapped or stale")
    # Loading rank 0's entry (on one process) reads the file that now holds rank 1's data.
    target = {"x": shardckpt.PerRank(torch.zeros(1000))}
    _raises(CorruptCheckpointError, lambda: shardckpt.load(target, path), str(path), f0.name, "swapped or stale")


def test_two_rank_save_loads(two_rank_saves, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(two_rank_saves["equal"], path)
    shardckpt.verify(path)
    target = {"x": shardckpt.PerRank(torch.zeros(1000))}
    shardckpt.load(target, path)
    assert torch.equal(target["x"].value, torch.arange(1000, dtype=torch.float32))


def test_swapped_data_files_of_equal_size(two_rank_saves, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(two_rank_saves["equal"], path)
    _check_swapped(path)


def test_swapped_data_files_of_different_size(two_rank_saves, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(two_rank_saves["unequal"], path)
    _check_swapped(path)


def test_swapped_data_files_of_different_size_are_refused(two_rank_saves, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(two_rank_saves["unequal"], path)
    _swap(path)
    _raises(CorruptCheckpointError, lambda: shardckpt.verify(path), str(path))
    target = {"x": shardckpt.PerRank(torch.zeros(1000))}
    _raises(CorruptCheckpointError, lambda: shardckpt.load(target, path), str(path))


# --- flipped bits -------------------------------------------------------------------------------


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


@pytest.mark.parametrize("key", ["w", "emb", "ids", "mask"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_bit_in_a_block(ckpt, key, where):
    index = shardckpt.read_index(ckpt)
    (entry,) = [t for t in index.tensors if t.key == key]
    block = entry.blocks[-1 if where == "last" else 0]
    at = {"first": 0, "middle": block.length // 2, "last": block.length - 1}[where]
    _flip(ckpt / index.files[block.file].name, block.offset + at, bit=5)
    for call in (lambda: shardckpt.verify(ckpt), lambda: _load(ckpt)):
        _raises(CorruptCheckpointError, call, str(ckpt), repr(key), "checksum")
    # A load that does not ask for the damaged tensor still works.
    target = _target()
    del target[key]
    shardckpt.load(target, ckpt)
    assert target["step"] == 100


@pytest.mark.parametrize("offset", [0, 8, 12, 16, 63])
def test_flipped_bit_in_the_data_header(ckpt, offset):
    data = _data_file(ckpt)
    _flip(data, offset)
    for call in (lambda: shardckpt.verify(ckpt), lambda: _load(ckpt)):
        _raises(CorruptCheckpointError, call, str(ckpt), data.name)


def test_data_file_zeroed(ckpt):
    data = _data_file(ckpt)
    data.write_bytes(b"\0" * data.stat().st_size)
    for call in (lambda: shardckpt.verify(ckpt), lambda: _load(ckpt)):
        _raises(CorruptCheckpointError, call, str(ckpt), data.name)


# --- extra files --------------------------------------------------------------------------------


def test_unreferenced_data_file_is_an_orphan_not_corruption(ckpt):
    (ckpt / "data" / "leftover-r00003.bin").write_bytes(b"junk")
    report = shardckpt.verify(ckpt)  # the checkpoint is whole: an interrupted save left a file beside it
    assert report.orphans == ("data/leftover-r00003.bin",)
    assert (ckpt / "data" / "leftover-r00003.bin").exists()  # verify only reads
    _assert_loaded(_load(ckpt))


def test_next_save_removes_unreferenced_files(ckpt):
    (ckpt / "data" / "leftover-r00003.bin").write_bytes(b"junk")
    shardckpt.save(_state(2), ckpt, compression=BLOCKS)
    assert not (ckpt / "data" / "leftover-r00003.bin").exists()
    assert len(os.listdir(ckpt / "data")) == 1
    shardckpt.verify(ckpt)
    _assert_loaded(_load(ckpt), seed=2)


# --- target state mismatches --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "replacement", "what"),
    [
        ("w", torch.zeros(64, 256), "shape"),
        ("w", torch.zeros(256, 64, 1), "ndim"),
        ("w", torch.zeros(()), "scalar"),
        ("w", torch.zeros(256, 64, dtype=torch.float64), "dtype"),
        ("emb", torch.zeros(100, 48, dtype=torch.float16), "dtype"),
        ("mask", torch.zeros(7, 9, dtype=torch.uint8), "dtype"),
        ("ids", torch.zeros(500, dtype=torch.int32), "dtype"),
    ],
)
def test_shape_or_dtype_mismatch(ckpt, key, replacement, what):
    target = _target()
    target[key] = replacement
    err = _raises(StateMismatchError, lambda: shardckpt.load(target, ckpt), str(ckpt), repr(key))
    assert str(list(replacement.shape)) in str(err) or str(replacement.dtype).removeprefix("torch.") in str(err)


def test_tensor_where_checkpoint_has_a_value(ckpt):
    target = _target()
    target["step"] = torch.zeros(3)
    _raises(shardckpt.CheckpointError, lambda: shardckpt.load(target, ckpt), repr("step"))


def test_missing_keys_strict(ckpt):
    target = _target()
    target["extra"] = torch.zeros(3)
    target["more"] = {"a": torch.ones(2), "n": 5}
    err = _raises(MissingKeysError, lambda: shardckpt.load(target, ckpt), str(ckpt), "'extra'", "'more/a'", "'more/n'")
    assert "strict=False" in str(err)


def test_missing_keys_not_strict_loads_the_rest(ckpt):
    target = _target()
    target["extra"] = torch.full((3,), 7.0)
    target["more"] = {"a": torch.ones(2), "n": 5}
    shardckpt.load(target, ckpt, strict=False)
    _assert_loaded(target)
    assert torch.equal(target["extra"], torch.full((3,), 7.0))
    assert target["more"]["n"] == 5 and torch.equal(target["more"]["a"], torch.ones(2))


def test_subset_load(ckpt):
    target = {"w": torch.zeros(256, 64)}
    shardckpt.load(target, ckpt)
    assert torch.equal(target["w"], _tensors()["w"])


# --- a save that fails midway leaves the previous checkpoint intact --------------------------------


def _snapshot(path: Path) -> dict[str, bytes]:
    # The lock file records who saved last; it is not part of the checkpoint.
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != LOCK_NAME
    }


def _assert_intact(path: Path, before: dict[str, bytes]) -> None:
    assert _snapshot(path) == before, "the previous checkpoint's files changed"
    shardckpt.verify(path)
    _assert_loaded(_load(path))


def test_failed_save_unsupported_value(ckpt):
    before = _snapshot(ckpt)
    state = _state(5)
    state["cfg"] = {"tags": {"a", "b"}}
    _raises(StateMismatchError, lambda: shardckpt.save(state, ckpt), "'cfg'")
    _assert_intact(ckpt, before)


def test_failed_save_unsupported_dtype(ckpt):
    before = _snapshot(ckpt)
    state = _state(5)
    state["bad"] = torch.zeros(3, dtype=torch.float8_e4m3fnuz)
    _raises(StateMismatchError, lambda: shardckpt.save(state, ckpt), "'bad'")
    _assert_intact(ckpt, before)


@pytest.fixture
def inject():
    yield faults.configure
    faults.configure("")


@pytest.mark.parametrize("point", ["index_write", "rename"])
def test_failed_commit(ckpt, inject, point):
    inject(f"{point}:1:enospc")
    before = _snapshot(ckpt)
    _raises(CheckpointIOError, lambda: shardckpt.save(_state(5), ckpt, compression=BLOCKS), "No space left")
    _assert_intact(ckpt, before)  # and the failed save left no orphaned data file


def test_failure_after_the_rename_deletes_nothing(ckpt, inject):
    # The rename published the new index: the directory fsync after it fails. The save raises (the
    # commit may not survive a power loss), but the published index must name intact data.
    inject("dir_fsync:1:eio")
    _raises(CheckpointIOError, lambda: shardckpt.save(_state(5), ckpt, compression=BLOCKS), "was published")
    report = shardckpt.verify(ckpt)
    # The previous save's data stays: if a power loss undid the rename, the old index would need it.
    assert len(report.orphans) == 1
    _assert_loaded(_load(ckpt), seed=5)


def test_cleanup_failure_after_commit_does_not_fail_the_save(ckpt, inject):
    inject("cleanup:1:eio")
    shardckpt.save(_state(5), ckpt, compression=BLOCKS)
    report = shardckpt.verify(ckpt)
    assert len(report.orphans) == 1  # the old data file stayed; reported, not an error
    _assert_loaded(_load(ckpt), seed=5)
    shardckpt.save(_state(6), ckpt, compression=BLOCKS)  # the next save removes it
    assert shardckpt.verify(ckpt).orphans == ()


def test_failed_data_write(ckpt, monkeypatch):
    from shardckpt.pipeline import writer

    real = writer.encode_block
    calls = []

    def encode_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise CheckpointIOError("simulated failure: write error")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "encode_block", encode_then_fail)
    before = _snapshot(ckpt)
    _raises(CheckpointIOError, lambda: shardckpt.save(_state(5), ckpt, compression=BLOCKS), "simulated")
    _assert_intact(ckpt, before)


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so no cleanup path catches it."""


def test_crash_before_commit(ckpt, monkeypatch):
    def crash(*_args, **_kwargs):
        raise Crash

    monkeypatch.setattr("shardckpt.commit.encode_index", crash)
    index_before = (ckpt / "index.json").read_bytes()
    data_before = {p.name: p.read_bytes() for p in (ckpt / "data").iterdir()}
    with pytest.raises(Crash):
        shardckpt.save(_state(5), ckpt, compression=BLOCKS)
    monkeypatch.undo()
    # The index and the previous data are untouched. Even a BaseException (KeyboardInterrupt,
    # SystemExit) reaches the point where the save knows nothing was published: no orphan is left.
    assert (ckpt / "index.json").read_bytes() == index_before
    assert {p.name: p.read_bytes() for p in (ckpt / "data").iterdir()} == data_before
    assert shardckpt.verify(ckpt).orphans == ()
    _assert_loaded(_load(ckpt))
    # The next save commits.
    shardckpt.save(_state(6), ckpt, compression=BLOCKS)
    shardckpt.verify(ckpt)
    _assert_loaded(_load(ckpt), seed=6)


# --- no pickle on the load path -----------------------------------------------------------------


def test_load_runs_no_pickle(ckpt, monkeypatch):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("pickle or torch.load used on the load path")

    class NoUnpickler:
        def __init__(self, *_args, **_kwargs):
            forbidden()

    import _pickle

    for module in (pickle, _pickle):
        monkeypatch.setattr(module, "loads", forbidden)
        monkeypatch.setattr(module, "load", forbidden)
        monkeypatch.setattr(module, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    shardckpt.read_index(ckpt)
    shardckpt.verify(ckpt)
    _assert_loaded(_load(ckpt))
    per_rank = {"x": shardckpt.PerRank(torch.zeros(4))}
    _raises(MissingKeysError, lambda: shardckpt.load(per_rank, ckpt), "'x (rank 0)'")
