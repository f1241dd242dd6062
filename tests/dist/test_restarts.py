"""Restarts under real torchrun, with and without TORCH_DISABLE_SHARE_RDZV_TCP_STORE.

torchrun shares its rendezvous store with the workers by default, and the store outlives a restart:
group keys named the same in every attempt can return the dead attempt's addresses. torch's own
``init_process_group`` is exposed to that (pytorch/pytorch#135712) and shardckpt cannot change it,
so it warns; shardckpt's own side group keys live under a prefix drawn fresh per job group. The
tests hold shardckpt to this: once torch's group is up in a restarted attempt, that attempt
restores bit-exactly (the job checks) and finishes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).with_name("restart_job.py")
ROOT = Path(__file__).resolve().parents[2]


def _restart_job(root: Path, share_store: bool, restarts: int = 3) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if not share_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(JOB), str(root), "10", "6"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def _attempts_past_init(out: str) -> dict[int, set[int]]:
    seen: dict[int, set[int]] = {}
    # Not anchored: lines the workers print at the same moment can share a line of torchrun's output.
    for attempt, rank in re.findall(r"init-ok attempt (\d+) rank (\d)", out):
        seen.setdefault(int(attempt), set()).add(int(rank))
    return seen


def _check(out: str, rc: int) -> None:
    inited = _attempts_past_init(out)
    done = {int(a) for a in re.findall(r"done attempt (\d+) rank 0", out)}
    assert 0 in inited and 0 not in done, "attempt 0 must start and be killed\n" + out[-4000:]
    # Every restarted attempt whose torch group came up on both ranks restored and finished.
    for attempt, ranks in inited.items():
        if attempt >= 1 and ranks == {0, 1}:
            assert attempt in done, f"attempt {attempt} failed after torch's init\n" + out[-6000:]
            assert rc == 0, f"attempt {attempt} finished on rank 0, yet torchrun failed\n" + out[-6000:]
    assert re.search(r"attempt [1-9]\d*: world 2, resumed \d+", out) or rc != 0, out[-4000:]


def test_restart_with_a_private_store_restores_exactly(tmp_path):
    rc, out = _restart_job(tmp_path / "ck", share_store=False)
    assert rc == 0, out[-6000:]
    _check(out, rc)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" not in out  # no warning when the setting is safe


def test_restart_over_torchruns_shared_store_restores_exactly_and_warns(tmp_path):
    rc, out = _restart_job(tmp_path / "ck", share_store=True)
    _check(out, rc)
    assert "Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment" in out
