"""async_save's encoder and writer threads run at the lowest priority, so that they take only the
CPU the training loop leaves idle; the training thread, the work inside the stall and the commit
(collectives other ranks wait for) keep theirs. ``SHARDCKPT_BACKGROUND_NICE`` sets the value (0-19, default 19)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
from torch import nn

import shardckpt
from shardckpt.async_save import lower_priority, saver_for
from shardckpt.dist import Comm
from shardckpt.errors import StateMismatchError
from shardckpt.options import background_nice

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's"),
]


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _niced_tasks(above: int) -> set[int]:
    """The ids of this process's OS threads whose nice value is above ``above`` (any thread,
    Python's or a library's: a pool that a lowered thread started would inherit its priority)."""
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended meanwhile
            continue
        if int(fields[16]) > above:  # field 19 of stat, "nice"; 16 after pid, comm and state
            out.add(int(tid))
    return out


def _pool_threads(*prefixes: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefixes)]


@pytest.fixture
def fresh_savers():
    """Savers made under this test's environment; the next test gets ones made under its own."""
    shardckpt.shutdown()
    yield
    shardckpt.shutdown()


@pytest.mark.parametrize("setting, nice", [(None, 19), ("7", 7), ("0", 0)])
def test_background_threads_run_at_the_set_priority_and_the_training_thread_keeps_its_own(
    tmp_path, monkeypatch, fresh_savers, setting, nice
):
    if setting is None:
        monkeypatch.delenv("SHARDCKPT_BACKGROUND_NICE", raising=False)
    else:
        monkeypatch.setenv("SHARDCKPT_BACKGROUND_NICE", setting)
    own = _nice(threading.get_native_id())
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    shardckpt.async_save({"model": model}, tmp_path / "c", compression="zstd").wait()

    background = _pool_threads("shardckpt-write")
    assert background
    assert {_nice(t.native_id) for t in background} == {max(own, nice)}  # type: ignore[arg-type]
    assert {_nice(t.native_id) for t in _pool_threads("shardckpt-commit")} == {own}  # type: ignore[arg-type]
    (torch.randn(512, 512) @ torch.randn(512, 512)).sum()  # the training's own thread pools, after the save
    assert _niced_tasks(own) <= {t.native_id for t in background}
    assert _nice(threading.get_native_id()) == own
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    shardckpt.load({"model": model}, tmp_path / "c")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())


def test_a_pool_thread_is_lowered_whichever_thread_starts_it(monkeypatch, fresh_savers):
    """Not only by inheritance: a thread started by the training thread is lowered too."""
    monkeypatch.delenv("SHARDCKPT_BACKGROUND_NICE", raising=False)
    own = _nice(threading.get_native_id())
    saver = saver_for(Comm.for_group(None))

    def priority() -> int:
        return _nice(threading.get_native_id())

    assert saver.writers.submit(priority).result() == max(own, 19)
    assert saver.committer.submit(priority).result() == own  # collectives other ranks wait for
    assert saver.hashers.submit(priority).result() == own  # the stall's work keeps the training's priority


def test_lowering_never_raises_a_threads_priority():
    if _nice(threading.get_native_id()) > 10:
        pytest.skip("this process already runs above nice 10")
    seen: dict[str, int] = {}

    def run() -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 12)
        lower_priority(5)
        seen["asked 5 at 12"] = _nice(tid)
        lower_priority(15)
        seen["asked 15 at 12"] = _nice(tid)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == {"asked 5 at 12": 12, "asked 15 at 12": 15}


@pytest.mark.parametrize("setting", ["20", "-1", "low", "1.5"])
def test_a_bad_setting_is_refused_before_any_save(tmp_path, monkeypatch, fresh_savers, setting):
    monkeypatch.setenv("SHARDCKPT_BACKGROUND_NICE", setting)
    with pytest.raises(StateMismatchError, match="SHARDCKPT_BACKGROUND_NICE"):
        background_nice()
    with pytest.raises(StateMismatchError, match="SHARDCKPT_BACKGROUND_NICE"):
        shardckpt.async_save({"w": torch.ones(4)}, tmp_path / "c")
    assert not (tmp_path / "c").exists()
