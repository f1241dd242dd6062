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
    assert sorted(os.listdir(tmp_path)) == [f"step-{s:08d}" for s in (5, 10, 11, 12)]
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
    # Only committed steps are listed: the async save of step 6 may still be in flight.
    assert m.latest_step() in (4, 6) and (m.latest_step() == 6) == (m.path_for(6) / "index.json").exists()
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


def test_torn_saves_are_never_listed_and_get_cleaned(tmp_path):
    m = CheckpointManager(tmp_path, async_save=False)
    m.save(1, _state(1))
    torn = tmp_path / "step-00000002"
    (torn / "data").mkdir(parents=True)
    (torn / "data" / "abcd1234-r00000.bin").write_bytes(b"half a save")
    assert m.steps() == [1] and m.latest_step() == 1
    CheckpointManager(tmp_path)  # a restarted job cleans up
    assert not torn.exists()
    assert CheckpointManager(tmp_path).restore(_state(0)) == 1


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
    for s in steps:
        report = shardckpt.verify(m.path_for(s))
        assert report.tensors == 2
        target = {"w": torch.zeros(1024, 1024), "b": torch.zeros(512, 512, dtype=torch.bfloat16), "step": 0}
        assert m.restore(target, step=s) == s and target["step"] == s and float(target["w"][7, 7]) == float(s)
    assert all((root / d / "index.json").exists() for d in os.listdir(root))  # torn dirs were cleaned
