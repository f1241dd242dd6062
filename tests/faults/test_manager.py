"""CheckpointManager: policies, retention, restore, torn saves, SIGKILL mid-save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import shardckpt
from shardckpt import CheckpointManager


@pytest.fixture(autouse=True)
def _fresh_savers():
    yield
    shardckpt.shutdown()


def _state(step: int) -> dict[str, object]:
    return {"w": torch.full((64, 64), float(step)), "step": step}


@pytest.mark.parametrize("use_async", [True, False])
def test_retention_keeps_last_and_every(tmp_path, use_async):
    m = CheckpointManager(tmp_path, keep_last=2, keep_every=5, async_save=use_async)
    for step in range(1, 13):
        m.save(step, _state(step))
    m.close()
    assert m.steps() == [5, 10, 11, 12]
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step-")) == [f"step-{s:08d}" for s in (5, 10, 11, 12)]
    for s in m.steps():
        shardckpt.verify(m.path_for(s))


def test_interval_policy_and_force(tmp_path):
    m = CheckpointManager(tmp_path, save_interval=3)
    saved = [s for s in range(1, 10) if m.save(s, _state(s)) is not None]
    assert m.save(10, _state(10), force=True) is not None
    m.close()
    assert saved == [3, 6, 9] and m.steps() == [3, 6, 9, 10]


def test_restore_latest_given_and_none(tmp_path):
    m = CheckpointManager(tmp_path)
    target = {"w": torch.zeros(64, 64), "step": -1}
    assert m.restore(target) is None and target["step"] == -1
    for s in (2, 4, 6):
        m.save(s, _state(s))
    m.wait()
    assert m.latest_step() == 6
    assert m.restore(target) == 6 and target["step"] == 6 and float(target["w"][0, 0]) == 6.0
    assert m.restore(target, step=4) == 4 and target["step"] == 4
    with pytest.raises(shardckpt.CheckpointNotFoundError, match="step 5"):
        m.restore(target, step=5)
    m.close()


def test_newest_is_never_deleted_and_bad_policy_rejected(tmp_path):
    m = CheckpointManager(tmp_path, keep_every=100)
    for s in (1, 2, 3):
        m.save(s, _state(s))
    m.close()
    assert m.steps() == [3]
    with pytest.raises(shardckpt.StateMismatchError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def _tree(root) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under root with its mtime, size and (for files) contents."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size, p.read_bytes() if p.is_file() else b"")
    return out


def _torn(root, step: int):
    torn = root / f"step-{step:08d}"
    (torn / "data").mkdir(parents=True)
    (torn / "data" / "abcd1234-r00000.bin").write_bytes(b"half a save")
    return torn


def test_torn_saves_are_never_listed_and_only_a_saving_manager_cleans_them(tmp_path):
    m = CheckpointManager(tmp_path, async_save=False)
    m.save(1, _state(1))
    m.close()
    torn = _torn(tmp_path, 2)
    assert m.steps() == [1] and m.latest_step() == 1
    assert CheckpointManager(tmp_path).restore(_state(0)) == 1  # a restarted job restores
    assert torn.exists()  # ... and neither its constructor nor restore deleted anything
    m2 = CheckpointManager(tmp_path)
    m2.save(3, _state(3))  # its first save runs the garbage collection
    assert not torn.exists()
    m2.close()
    assert m2.steps() == [1, 3]


def test_read_only_calls_and_commands_change_nothing(tmp_path, capsys):
    from shardckpt.cli import main

    m = CheckpointManager(tmp_path, async_save=False)
    for s in (1, 2):
        m.save(s, _state(s))
    m.close()
    _torn(tmp_path, 3)  # looks exactly like a save in progress by another job
    before = _tree(tmp_path)
    m2 = CheckpointManager(tmp_path, keep_last=1)
    assert m2.steps() == [1, 2] and m2.latest_step() == 2
    assert m2.restore(_state(0)) == 2
    m2.close()  # a manager that never saved holds no lock and collects nothing
    shardckpt.read_index(m.path_for(1))
    shardckpt.verify(m.path_for(1))
    for argv in (["ls", str(tmp_path)], ["inspect", str(m.path_for(2))], ["verify", str(m.path_for(2))]):
        assert main(argv) == 0
    capsys.readouterr()
    assert _tree(tmp_path) == before


def test_second_manager_or_job_on_a_root_is_refused(tmp_path):
    m1 = CheckpointManager(tmp_path)
    m1.save(1, _state(1))
    m2 = CheckpointManager(tmp_path)
    with pytest.raises(shardckpt.CheckpointInUseError, match=f"pid {os.getpid()}"):
        m2.save(2, _state(2))
    m1.close()  # gives the root back
    m2.save(2, _state(2))
    m2.close()
    assert m2.steps() == [1, 2]
    # Another process saving into the root: refused while it holds the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, pathlib; from shardckpt.storage.lock import PathLock; "
         "PathLock(pathlib.Path(sys.argv[1]), 'test').acquire(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        m3 = CheckpointManager(tmp_path)
        with pytest.raises(shardckpt.CheckpointInUseError, match=f"pid {holder.pid}"):
            m3.save(3, _state(3))
    finally:
        holder.kill()
        holder.wait()
    m3.save(3, _state(3))  # the kernel dropped the dead holder's lock
    m3.close()


def test_two_jobs_saving_one_path_the_second_is_refused(tmp_path):
    from shardckpt.storage.lock import PathLock

    path = tmp_path / "ckpt"
    shardckpt.save(_state(1), path)
    other = PathLock(path, "another job's save")
    other.acquire()  # another job is in the middle of a save into the same path
    try:
        with pytest.raises(shardckpt.CheckpointInUseError, match="another job's save"):
            shardckpt.save(_state(2), path)
        with pytest.raises(shardckpt.CheckpointInUseError):
            shardckpt.async_save(_state(2), path)
    finally:
        other.release()
    target = _state(0)
    shardckpt.load(target, path)
    assert target["step"] == 1  # the refused saves touched nothing


@pytest.mark.parametrize(
    ("damage", "error", "cause"),
    [
        # Found before reading (restore's completeness check): the step "cannot be restored".
        ("missing file", shardckpt.CheckpointNotFoundError, "step 3 under .* cannot be restored: IncompleteCheckpointError: "
         "data file .*step-00000003/data/.* is missing"),
        ("truncated file", shardckpt.CheckpointNotFoundError, "step 3 under .* cannot be restored: CorruptCheckpointError: "
         r".*is \d+ bytes, the index says \d+ \(truncated\)"),
        # Found only by the load's checksums.
        ("flipped byte", shardckpt.CorruptCheckpointError, "step-00000003: checksum mismatch in data/"),
        ("garbled index", shardckpt.CheckpointNotFoundError, "step 3 under .* cannot be restored: IndexFormatError: "
         ".*index is not valid JSON"),
    ],
)
def test_restore_falls_back_to_the_newest_complete_step(tmp_path, caplog, damage, error, cause):
    m = CheckpointManager(tmp_path, async_save=False)
    for s in (1, 2, 3):
        m.save(s, _state(s))
    m.close()
    newest = m.path_for(3)
    (data,) = list((newest / "data").iterdir())
    if damage == "missing file":
        data.unlink()
    elif damage == "truncated file":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "flipped byte":  # same size: only the load's checksums find it
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        (newest / "index.json").write_text("{not json")
    target = _state(0)
    with caplog.at_level("WARNING", logger="shardckpt.manager"):
        assert m.restore(target) == 2
    assert target["step"] == 2 and float(target["w"][0, 0]) == 2.0
    assert "step 3" in caplog.text
    assert newest.exists()  # restore reads only: the damaged step is left for a person to look at
    with pytest.raises(error, match=cause):
        m.restore(target, step=3)  # a step asked for by number is never swapped for another


def test_restore_raises_when_no_step_is_complete(tmp_path):
    m = CheckpointManager(tmp_path, async_save=False)
    m.save(1, _state(1))
    m.close()
    next((m.path_for(1) / "data").iterdir()).unlink()
    with pytest.raises(shardckpt.IncompleteCheckpointError, match="none of the committed steps"):
        m.restore(_state(0))


def test_retention_has_run_when_close_returns(tmp_path):
    # Retention used to run on the background thread after wait() returned: repeat to catch it.
    for run in range(10):
        root = tmp_path / str(run)
        m = CheckpointManager(root, keep_last=1)
        for s in range(1, 6):
            m.save(s, _state(s))
        m.close()
        assert m.steps() == [5] and [d for d in os.listdir(root) if d.startswith("step-")] == ["step-00000005"]


_SAVER = textwrap.dedent(
    """
    import sys, torch, shardckpt
    m = shardckpt.CheckpointManager(sys.argv[1], keep_last=3)
    state = {"w": torch.randn(1024, 1024), "b": torch.randn(512, 512).to(torch.bfloat16), "step": 0}
    step = 0
    while True:
        step += 1
        state["step"] = step
        state["w"].fill_(float(step))
        m.save(step, state)
        print(step, flush=True)
    """
)


def test_sigkill_during_saves_keeps_committed_checkpoints(tmp_path):
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(6):  # let several saves commit, then kill in the middle of the next ones
            assert proc.stdout is not None and proc.stdout.readline()
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    m = CheckpointManager(root)
    steps = m.steps()
    assert steps, "no committed checkpoint survived"
    assert m.restore({"w": torch.zeros(1024, 1024), "b": torch.zeros(512, 512, dtype=torch.bfloat16), "step": 0}) == steps[-1]
    for s in steps:
        report = shardckpt.verify(m.path_for(s))
        assert report.tensors == 2
        target = {"w": torch.zeros(1024, 1024), "b": torch.zeros(512, 512, dtype=torch.bfloat16), "step": 0}
        assert m.restore(target, step=s) == s and target["step"] == s and float(target["w"][7, 7]) == float(s)
    m.save(steps[-1] + 1, {"w": torch.zeros(4), "step": 0})  # the restarted job's first save cleans up
    m.close()
    assert all((root / d / "index.json").exists() for d in os.listdir(root) if d.startswith("step-"))
