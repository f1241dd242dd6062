"""Escapes and hangs (issue 10): a checkpoint is a directory of regular files. A FIFO, socket or
directory where a file belongs is refused at once instead of blocking a read; a symbolic link inside
the checkpoint (a data file, ``index.json``, ``data/`` itself) is refused instead of followed, for
reads and for writes. Only the checkpoint directory itself may be a link (``latest -> step-100``)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import CheckpointError, CheckpointIOError, CorruptCheckpointError
from shardckpt.cli import main as cli

pytestmark = pytest.mark.timeout(60)

LINK = "is a symbolic link; a checkpoint never contains links"
NOT_REGULAR = "not a regular file"


@pytest.fixture(autouse=True)
def _fresh_savers():
    yield
    shardckpt.shutdown()


def _state(step: int = 1) -> dict[str, object]:
    return {"w": torch.arange(4096.0) + step, "step": step}


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    shardckpt.save(_state(), path)
    return path


def _data_file(path: Path) -> Path:
    (data,) = (path / "data").iterdir()
    return data


def _load(path: Path) -> None:
    shardckpt.load({"w": torch.zeros(4096), "step": 0}, path)


def _read_index(path: Path) -> None:
    shardckpt.read_index(path)


def _verify(path: Path) -> None:
    shardckpt.verify(path)


READERS: dict[str, Callable[[Path], None]] = {"read_index": _read_index, "verify": _verify, "load": _load}


def _raises_promptly(call: Callable[[], None], fifo: Path | None = None, seconds: float = 10.0) -> BaseException | None:
    """Run ``call`` on a thread and return what it raised (None if nothing). A call still running
    after ``seconds`` fails the test; a reader blocked on ``fifo`` is then released by opening its
    write end, so the hang is reported instead of wedging the test run."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the blocked open() returns; EOF follows
            os.close(fd)
            t.join(seconds)
        pytest.fail(f"still blocked after {seconds}s (a read of a FIFO?)")
    return box[0]


# --- non-regular files where a checkpoint file belongs -----------------------------------------


@pytest.mark.parametrize("reader", sorted(READERS))
def test_fifo_index_is_refused_not_waited_on(tmp_path, reader):
    path = _saved(tmp_path)
    (path / "index.json").unlink()
    os.mkfifo(path / "index.json")
    err = _raises_promptly(lambda: READERS[reader](path), fifo=path / "index.json")
    assert isinstance(err, CorruptCheckpointError), repr(err)
    assert f"{path / 'index.json'} is {NOT_REGULAR} (a FIFO)" in str(err)


def test_fifo_index_cli_inspect_and_verify_fail_promptly(tmp_path, capsys):
    path = _saved(tmp_path)
    (path / "index.json").unlink()
    os.mkfifo(path / "index.json")
    for command in ("inspect", "verify"):
        codes: list[int] = []
        err = _raises_promptly(lambda command=command, codes=codes: codes.append(cli([command, str(path)])),
                               fifo=path / "index.json")
        assert err is None and codes and codes[0] != 0, (command, err, codes)
    assert f"{NOT_REGULAR} (a FIFO)" in capsys.readouterr().err


def _make_fifo(p: Path) -> None:
    os.mkfifo(p)


def _make_directory(p: Path) -> None:
    p.mkdir()


def _make_socket(p: Path) -> socket.socket:
    # Bound by its name relative to its directory: AF_UNIX paths are limited to 108 bytes.
    s = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(p.parent)
    try:
        s.bind(p.name)
    finally:
        os.chdir(cwd)
    return s


@pytest.mark.parametrize(("kind", "make"), [("a FIFO", _make_fifo), ("a directory", _make_directory),
                                            ("a socket", _make_socket)])
@pytest.mark.parametrize("reader", ["verify", "load"])
def test_data_file_that_is_not_a_regular_file_is_refused(tmp_path, kind, make, reader):
    path = _saved(tmp_path)
    data = _data_file(path)
    data.unlink()
    keep = make(data)
    try:
        err = _raises_promptly(lambda: READERS[reader](path), fifo=data if kind == "a FIFO" else None)
    finally:
        if isinstance(keep, socket.socket):
            keep.close()
    assert isinstance(err, CorruptCheckpointError), repr(err)
    assert f"{data} is {NOT_REGULAR} ({kind})" in str(err)


def test_index_that_is_a_directory_is_refused(tmp_path):
    path = _saved(tmp_path)
    (path / "index.json").unlink()
    (path / "index.json").mkdir()
    with pytest.raises(CorruptCheckpointError, match=f"{NOT_REGULAR} \\(a directory\\)"):
        shardckpt.read_index(path)


# --- symbolic links inside a checkpoint: never followed -----------------------------------------


def test_symlinked_data_file_is_refused_and_its_target_never_read(tmp_path):
    path = _saved(tmp_path)
    data = _data_file(path)
    outside = tmp_path / "outside.bin"
    shutil.move(data, outside)
    data.symlink_to(outside)
    before = outside.read_bytes()
    for name, reader in READERS.items():
        if name == "read_index":
            reader(path)  # the index alone is intact
            continue
        with pytest.raises(CorruptCheckpointError, match=LINK) as info:
            reader(path)
        assert str(data) in str(info.value)
    assert outside.read_bytes() == before


def test_symlinked_index_is_refused(tmp_path):
    path = _saved(tmp_path)
    outside = tmp_path / "outside.json"
    shutil.move(path / "index.json", outside)
    (path / "index.json").symlink_to(outside)
    for reader in READERS.values():
        with pytest.raises(CorruptCheckpointError, match=LINK) as info:
            reader(path)
        assert str(path / "index.json") in str(info.value)


def test_symlinked_data_dir_is_refused_for_reads(tmp_path):
    path = _saved(tmp_path)
    outside = tmp_path / "outside"
    shutil.move(path / "data", outside)
    (path / "data").symlink_to(outside)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    for reader in (_verify, _load):
        with pytest.raises(CorruptCheckpointError, match=LINK) as info:
            reader(path)
        assert str(path / "data") in str(info.value)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_checkpoint_root_itself_may_be_a_symlink(tmp_path):
    # ``latest -> step-100`` is common: the root is resolved once, nothing inside it is.
    path = _saved(tmp_path)
    latest = tmp_path / "latest"
    latest.symlink_to(path)
    shardckpt.read_index(latest)
    assert shardckpt.verify(latest).tensors == 1
    got = {"w": torch.zeros(4096), "step": 0}
    shardckpt.load(got, latest)
    assert got["step"] == 1 and torch.equal(got["w"], torch.arange(4096.0) + 1)
    shardckpt.save(_state(2), latest)  # and a save through it lands in the real directory
    assert shardckpt.read_index(path).save_id == shardckpt.read_index(latest).save_id
    assert shardckpt.verify(path).orphans == ()


def test_restore_falls_back_past_a_step_with_a_symlinked_data_file(tmp_path):
    m = shardckpt.CheckpointManager(tmp_path / "root", async_save=False)
    for s in (1, 2):
        m.save(s, _state(s))
    m.close()
    data = _data_file(m.path_for(2))
    outside = tmp_path / "outside.bin"
    shutil.move(data, outside)
    data.symlink_to(outside)
    got = {"w": torch.zeros(4096), "step": 0}
    assert m.restore(got) == 1 and got["step"] == 1


# --- writes never leave the checkpoint ----------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("use_async", [False, True])
def test_save_into_a_symlinked_data_dir_is_refused(tmp_path, use_async):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"not ours")
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "data").symlink_to(outside)
    with pytest.raises(CheckpointIOError, match=LINK) as info:
        if use_async:
            shardckpt.async_save(_state(), path).wait()
        else:
            shardckpt.save(_state(), path)
    assert str(path / "data") in str(info.value)
    assert _tree(outside) == {"precious.bin": b"not ours"}  # nothing written, nothing deleted
    assert not (path / "index.json").exists()


def test_publish_never_writes_through_a_planted_temp_link(tmp_path):
    # The index's temp name is predictable (pid and thread): a link planted there must not redirect it.
    path = _saved(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not ours")
    (path / f".index.json.tmp-{os.getpid()}-{threading.get_ident()}").symlink_to(victim)
    before = (path / "index.json").read_bytes()
    with pytest.raises(CheckpointError, match="cannot commit"):
        shardckpt.save(_state(2), path)
    assert victim.read_bytes() == b"not ours"
    assert (path / "index.json").read_bytes() == before and not (path / "index.json").is_symlink()
    _verify(path)


def test_manager_never_saves_through_a_symlinked_step_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    m = shardckpt.CheckpointManager(root, async_save=False)
    m.save(1, {"w": torch.ones(4)})
    (root / "step-00000002").symlink_to(outside)  # planted where the next step will go
    with pytest.raises(shardckpt.CheckpointIOError, match="symbolic link"):
        m.save(2, {"w": torch.ones(4)})
    m.close()
    assert list(outside.iterdir()) == [] and m.steps() == [1]
