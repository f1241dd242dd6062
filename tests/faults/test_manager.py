"""CheckpointManager: policies, retention, restore, torn saves, SIGKILL mid-save.

Most tests run on both backends (``place``: a local directory and a fresh prefix on a moto S3
server, tests/backends.py), because the manager promises the same on both. The two lock tests stay
local: they are about flock, a local-filesystem lock, and S3 takes no lock (one job per root is an
assumption there, docs/object_storage.md)."""

from __future__ import annotations

import gc
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
from tests.backends import Place

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _fresh_savers():
    yield
    shardckpt.shutdown()


def _state(step: int) -> dict[str, object]:
    return {"w": torch.full((64, 64), float(step)), "step": step}


def _names(*steps: int) -> list[str]:
    return [f"step-{s:08d}" for s in steps]


def _listed_steps_verify(place: Place, damaged: frozenset[int] = frozenset()) -> list[int]:
    """Every step ``committed_steps`` lists verifies, but those a test damaged on purpose."""
    listed = shardckpt.committed_steps(place.root)
    for s in listed:
        if s not in damaged:
            assert shardckpt.verify(place.at(f"step-{s:08d}")).tensors >= 1, s
    return listed


@pytest.mark.parametrize("use_async", [True, False])
def test_retention_keeps_last_and_every(place, use_async):
    m = CheckpointManager(place.root, keep_last=2, keep_every=5, async_save=use_async)
    for step in range(1, 13):
        m.save(step, _state(step))
    m.close()
    assert m.steps() == [5, 10, 11, 12]
    assert place.step_dirs() == _names(5, 10, 11, 12)
    assert _listed_steps_verify(place) == [5, 10, 11, 12]


def test_interval_policy_and_force(place):
    m = CheckpointManager(place.root, save_interval=3)
    saved = [s for s in range(1, 10) if m.save(s, _state(s)) is not None]
    assert m.save(10, _state(10), force=True) is not None
    m.close()
    assert saved == [3, 6, 9] and m.steps() == [3, 6, 9, 10]
    assert place.step_dirs() == _names(3, 6, 9, 10)


def test_restore_latest_given_and_none(place):
    m = CheckpointManager(place.root)
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


def test_newest_is_never_deleted_and_bad_policy_rejected(place):
    m = CheckpointManager(place.root, keep_every=100)
    for s in (1, 2, 3):
        m.save(s, _state(s))
    m.close()
    assert m.steps() == [3] and place.step_dirs() == _names(3)
    with pytest.raises(shardckpt.StateMismatchError, match="keep_last"):
        CheckpointManager(place.root, keep_last=0)


def _torn(place: Place, step: int) -> str:
    """A save killed before its commit: a data file, no index."""
    name = f"step-{step:08d}"
    place.write(f"{name}/data/abcd1234-r00000.bin", b"half a save")
    return name


def test_torn_saves_are_never_listed_and_only_a_saving_manager_cleans_them(place):
    m = CheckpointManager(place.root, async_save=False)
    m.save(1, _state(1))
    m.close()
    torn = _torn(place, 2)
    assert m.steps() == [1] and m.latest_step() == 1 and shardckpt.committed_steps(place.root) == [1]
    assert CheckpointManager(place.root).restore(_state(0)) == 1  # a restarted job restores
    assert torn in place.step_dirs()  # ... and neither its constructor nor restore deleted anything
    m2 = CheckpointManager(place.root)
    m2.save(3, _state(3))  # its first save runs the garbage collection
    assert torn not in place.step_dirs()
    m2.close()
    assert m2.steps() == [1, 3] and place.step_dirs() == _names(1, 3)
    _listed_steps_verify(place)


def test_read_only_calls_and_commands_change_nothing(place, capsys):
    from shardckpt.cli import main

    m = CheckpointManager(place.root, async_save=False)
    for s in (1, 2):
        m.save(s, _state(s))
    m.close()
    _torn(place, 3)  # looks exactly like a save in progress by another job
    before = place.snapshot()
    m2 = CheckpointManager(place.root, keep_last=1)
    assert m2.steps() == [1, 2] and m2.latest_step() == 2
    assert m2.restore(_state(0)) == 2
    m2.close()  # a manager that never saved holds no lock and collects nothing
    shardckpt.read_index(m.path_for(1))
    shardckpt.verify(m.path_for(1))
    shardckpt.committed_steps(place.root)
    for argv in (["ls", str(place.root)], ["inspect", str(m.path_for(2))], ["verify", str(m.path_for(2))]):
        assert main(argv) == 0
    capsys.readouterr()
    assert place.snapshot() == before


# Local only: flock is a lock of the local filesystem; on S3 one job per root is an assumption.
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
         "lock = PathLock(pathlib.Path(sys.argv[1]), 'test'); lock.acquire(); print('locked', flush=True); time.sleep(60)",
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


# Local only, as above (flock).
def test_a_manager_left_unclosed_or_left_by_an_exception_gives_the_root_back(tmp_path):
    def job_that_fails() -> None:
        m = CheckpointManager(tmp_path)
        m.save(1, _state(1))
        m.wait()
        raise RuntimeError("the training loop failed")

    with pytest.raises(RuntimeError):
        job_that_fails()
    gc.collect()  # the unclosed manager is gone: its lock must be too
    with pytest.raises(RuntimeError), CheckpointManager(tmp_path) as m:
        m.save(2, _state(2))
        raise RuntimeError("the training loop failed")
    with CheckpointManager(tmp_path, keep_last=1) as m:  # not refused: the root was given back
        m.save(3, _state(3))
    assert m.steps() == [3]  # and leaving the block applied retention


# Local only, as above (flock).
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
def test_restore_falls_back_to_the_newest_complete_step(place, caplog, damage, error, cause):
    m = CheckpointManager(place.root, async_save=False)
    for s in (1, 2, 3):
        m.save(s, _state(s))
    m.close()
    (data,) = place.files("step-00000003/data")
    if damage == "missing file":
        place.delete(data)
    elif damage == "truncated file":
        place.truncate(data, 100)
    elif damage == "flipped byte":  # same size: only the load's checksums find it
        place.flip(data)
    else:
        place.write("step-00000003/index.json", b"{not json")
    before = place.snapshot()
    target = _state(0)
    with caplog.at_level("WARNING", logger="shardckpt.manager"):
        assert m.restore(target) == 2
    assert target["step"] == 2 and float(target["w"][0, 0]) == 2.0
    assert "step 3" in caplog.text
    with pytest.raises(error, match=cause):
        m.restore(target, step=3)  # a step asked for by number is never swapped for another
    assert place.snapshot() == before  # restore reads only: the damaged step is left for a person
    assert _listed_steps_verify(place, damaged=frozenset({3})) == [1, 2, 3]


@pytest.mark.parametrize("damage", ["truncated file", "flipped byte"])
@pytest.mark.parametrize("newest", [True, False])
def test_a_damaged_step_never_takes_the_place_of_the_last_loadable_one(place, damage, newest, caplog):
    # Steps 10 (good) and 11 or 20 (damaged); keep_last=1. The restore loads 10. Until a newer
    # save has committed, 10 is the only step a crash could come back to: retention must keep it.
    bad = 20 if newest else 11
    m = CheckpointManager(place.root, async_save=False)
    for s in (10, bad):
        m.save(s, _state(s))
    m.close()
    (data,) = place.files(f"step-{bad:08d}/data")
    place.truncate(data, 100) if damage == "truncated file" else place.flip(data)
    m = CheckpointManager(place.root, keep_last=1, async_save=False)
    target = _state(0)
    assert m.restore(target) == 10 and target["step"] == 10
    # A crash inside the next save (simulated: housekeeping ran, nothing of step 12 committed)
    # would leave only what retention kept.
    with caplog.at_level("WARNING", logger="shardckpt.cleanup"):
        m.save(12, _state(12))
    assert 10 in m.steps()
    assert "numbered after" not in caplog.text  # a damaged later step is no hazard: restore skips it
    m.save(13, _state(13))  # 12 is committed and loads: now 10 may go
    m.close()
    # A damaged step is never counted. Numbered after the saves it is left alone; older than
    # the newest loadable step it goes like any old step.
    kept = [13, 20] if newest else [13]
    assert m.steps() == kept
    assert m.restore(_state(0)) == 13
    assert _listed_steps_verify(place, damaged=frozenset({bad})) == kept


def test_a_step_whose_commit_was_not_made_durable_is_not_counted(place):
    # Step 2's index was published but its directory fsync failed: the save raised, and a power
    # loss could still undo it. Until a later save commits, step 1 must stay.
    from shardckpt.storage import faults

    m = CheckpointManager(place.root, keep_last=1, async_save=False)
    m.save(1, _state(1))
    faults.configure("dir_fsync:1:eio")
    try:
        with pytest.raises(shardckpt.CheckpointError):
            m.save(2, _state(2))
    finally:
        faults.configure("")
    assert m.steps() == [1, 2]
    m.save(3, _state(3))
    assert 1 in m.steps()
    m.close()
    assert m.steps() == [3]


def test_steps_numbered_after_the_save_are_left_alone(place, caplog):
    # A job that went back to step 100 while 200 exists: its new saves are not "older than 200"
    # for retention, and 200 is not deleted either (whether it is still wanted is the user's call).
    m = CheckpointManager(place.root, async_save=False)
    for s in (100, 200):
        m.save(s, _state(s))
    m.close()
    m = CheckpointManager(place.root, keep_last=1)
    assert m.restore(_state(0), step=100) == 100
    with caplog.at_level("WARNING", logger="shardckpt.cleanup"):
        for s in (101, 102, 103):
            m.save(s, _state(s))
        m.close()
    assert m.steps() == [103, 200]
    assert "step(s) [200], numbered after step 103 being saved" in caplog.text
    assert _listed_steps_verify(place) == [103, 200]


def test_restore_raises_when_no_step_is_complete(place):
    m = CheckpointManager(place.root, async_save=False)
    m.save(1, _state(1))
    m.close()
    (data,) = place.files("step-00000001/data")
    place.delete(data)
    with pytest.raises(shardckpt.IncompleteCheckpointError, match="none of the committed steps"):
        m.restore(_state(0))


def test_retention_has_run_when_close_returns(place):
    # Retention used to run on the background thread after wait() returned: repeat to catch it.
    for run in range(10 if place.kind == "local" else 4):  # fewer on S3, where saves cost more: the race is the same
        root = place.at(str(run))
        m = CheckpointManager(root, keep_last=1)
        for s in range(1, 6):
            m.save(s, _state(s))
        m.close()
        assert m.steps() == [5] and place.step_dirs(str(run)) == ["step-00000005"]


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


def test_sigkill_during_saves_keeps_committed_checkpoints(place):
    # On S3 the killed process leaves uploads and objects of a step without its index.
    root = place.at("root")
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
    assert place.step_dirs("root") == _names(*m.steps())  # no torn step is left
