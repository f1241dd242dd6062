"""A small torchrun job for restart tests: async checkpoints every step, one rank SIGKILLs itself
on the first attempt, and each restart checks that the restored state is exactly what was saved.

    torchrun --standalone --nproc_per_node=2 --max-restarts=3 tests/dist/restart_job.py ROOT STEPS CRASH_AT

The state at step s is a pure function of (s, rank), so every restore can be checked bit-exactly.
Prints "init-ok attempt A rank R" once torch's own group is up, "attempt A: world W, resumed S"
(rank 0) after the restore, and "done attempt A rank R" at the end.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import shardckpt


def expected(step: int, rank: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(1000 * step + 7)
    shared = torch.randn(64, 33, generator=g)  # replicated: every rank holds the same values
    return {
        "w": shared,
        "mine": shardckpt.PerRank(torch.full((5,), float(step * 10 + rank))),
        "step": step,
    }


def main() -> None:
    root, steps, crash_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where it is, then ends
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # A bounded timeout: torch's own init reading a dead attempt's address (pytorch#135712, when
    # torchrun shares its store) fails in seconds and torchrun tries again.
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"init-ok attempt {attempt} rank {rank}", flush=True)
    # The hang timer again, for the job itself: on a loaded machine an init that waited out stale
    # addresses plus ten saves passed 60 s, and the timer ended a healthy rank after its peer finished.
    faulthandler.dump_traceback_later(120, exit=True)
    manager = shardckpt.CheckpointManager(root, keep_last=2)
    state: dict[str, object] = {"w": torch.zeros(64, 33), "mine": shardckpt.PerRank(torch.zeros(5)), "step": 0}
    resumed = manager.restore(state)
    if resumed is not None:
        want = expected(resumed, rank)
        assert torch.equal(state["w"], want["w"]), "restored w differs"  # type: ignore[arg-type]
        got, exp = state["mine"], want["mine"]
        assert isinstance(got, shardckpt.PerRank) and isinstance(exp, shardckpt.PerRank)
        assert torch.equal(got.value, exp.value), "restored per-rank value differs"
        assert state["step"] == resumed
    if rank == 0:
        print(f"attempt {attempt}: world {world}, resumed {resumed}", flush=True)
    for step in range((resumed or 0) + 1, steps + 1):
        state = expected(step, rank)
        if step == crash_at and rank == world - 1 and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        manager.save(step, state, force=True)
    manager.wait()
    manager.close()
    shardckpt.shutdown()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    print(f"done attempt {attempt} rank {rank}", flush=True)


if __name__ == "__main__":
    main()
