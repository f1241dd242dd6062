"""Ways a rank used to hang instead of raising, and lifetimes of what async saves create."""

from __future__ import annotations

import pytest
import torch

import shardckpt
from shardckpt.storage import faults
from tests.dist.harness import run_ranks

pytestmark = pytest.mark.timeout(120)


def _outcome(fn) -> str:
    try:
        fn()
    except shardckpt.CheckpointError as e:
        return type(e).__name__
    return "ok"


def unseen_failure_worker(rank: int, world_size: int, root: str) -> list[str]:
    state = {"w": torch.full((256,), 1.0), "r": shardckpt.PerRank(torch.full((256,), float(rank)))}  # each rank writes
    if rank == 1:
        faults.configure("fsync:1:eio")  # rank 1's data fsync fails: the save fails on every rank
    handle = shardckpt.async_save(state, f"{root}/a")  # the fault fires once: later fsyncs pass
    out = []
    if rank == 0:
        out.append(_outcome(handle.wait))  # rank 0 looks at the failure; rank 1 does not
    # The next save: rank 1 has an unseen failure and raises it. Rank 0 used to go on into the
    # first gather alone and wait there for good; now every rank raises in that gather.
    out.append(_outcome(lambda: shardckpt.async_save(state, f"{root}/b").wait(timeout=60)))
    out.append(_outcome(lambda: shardckpt.async_save(state, f"{root}/c").wait(timeout=60)))
    faults.configure("")
    shardckpt.shutdown()
    return out


def test_an_unseen_async_failure_makes_every_rank_raise(tmp_path):
    r0, r1 = run_ranks(2, unseen_failure_worker, str(tmp_path), timeout=90)
    assert r0 == ["RankFailedError", "RankFailedError", "ok"], r0
    assert r1 == ["CheckpointError", "ok"], r1
    assert not (tmp_path / "b" / "index.json").exists() and (tmp_path / "c" / "index.json").exists()


class Picky:
    """A stateful whose load_state_dict rejects what it gets on one rank only."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.value = 0

    def state_dict(self) -> dict[str, object]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if self.rank == 1:
            raise KeyError("lr_lambdas")
        self.value = int(state["value"])  # type: ignore[call-overload]


def load_state_dict_worker(rank: int, world_size: int, path: str) -> str:
    shardckpt.save({"obj": Picky(0), "w": torch.ones(4)}, path)
    target = {"obj": Picky(rank), "w": torch.zeros(4)}
    return _outcome(lambda: shardckpt.load(target, path))


def test_load_state_dict_failing_on_one_rank_raises_on_every_rank(tmp_path):
    outcomes = run_ranks(2, load_state_dict_worker, str(tmp_path / "c"), timeout=60)
    assert outcomes == ["RankFailedError", "StateMismatchError"], outcomes


def restore_missing_worker(rank: int, world_size: int, root: str) -> list[str]:
    m = shardckpt.CheckpointManager(root, async_save=False)
    m.save(1, {"w": torch.ones(4)})
    m.close()
    return [_outcome(lambda: m.restore({"w": torch.zeros(4)}, step=7)), str(m.restore({"w": torch.zeros(4)}))]


def test_restore_of_a_missing_step_raises_on_every_rank(tmp_path):
    outcomes = run_ranks(2, restore_missing_worker, str(tmp_path), timeout=60)
    assert outcomes == [["CheckpointNotFoundError", "1"], ["RankFailedError", "1"]], outcomes


def side_group_worker(rank: int, world_size: int, root: str) -> list[object]:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from shardckpt.dist import _GLOO_GROUPS

    sides = []
    for i in range(4):
        shardckpt.async_save({"w": torch.ones(8)}, f"{root}/{i}").wait(timeout=60)
        shardckpt.shutdown()
        sides.append(id(_GLOO_GROUPS[(id(dist.group.WORLD), "side")][1]))
    # A subgroup's side group too, over and over.
    sub = dist.new_group(ranks=[0, 1], use_local_synchronization=True)
    for i in range(3):
        shardckpt.async_save({"w": torch.ones(8)}, f"{root}/s{i}", process_group=sub).wait(timeout=60)
        shardckpt.shutdown(sub)
        sides.append(id(_GLOO_GROUPS[(id(sub), "side")][1]))
    # One side group per job group, none registered with torch (its keys live under a fresh prefix).
    return [len(set(sides[:4])), len(set(sides[4:])), sides[0] != sides[4], len(_GLOO_GROUPS), len(c10d._world.pg_map)]


def test_side_groups_are_made_once_per_group_and_reused(tmp_path):
    assert run_ranks(2, side_group_worker, str(tmp_path), timeout=90) == [[1, 1, True, 2, 2]] * 2


def replica_hash_worker(rank: int, world_size: int, path: str) -> str:
    import shardckpt.snapshot

    if rank == 1:  # hashing a replica fails on one rank (on a GPU: a device error in the copy)
        def broken(_tensor: object) -> str:
            raise RuntimeError("device-side assert triggered")

        assert hasattr(shardckpt.snapshot, "replica_digest")  # patching a name save no longer uses tests nothing
        shardckpt.snapshot.replica_digest = broken  # type: ignore[assignment]
    return _outcome(lambda: shardckpt.save({"w": torch.ones(64)}, path))


def test_replica_hashing_failing_on_one_rank_raises_on_every_rank(tmp_path):
    outcomes = run_ranks(2, replica_hash_worker, str(tmp_path / "c"), timeout=60)
    assert outcomes == ["RankFailedError", "CheckpointError"], outcomes
    assert not (tmp_path / "c" / "index.json").exists()


def stuck_peer_worker(rank: int, world_size: int, path: str) -> tuple[str, float]:
    import os
    import time

    import shardckpt.saving

    os.environ["SHARDCKPT_TIMEOUT_S"] = "3"  # read when the side group is made
    if rank == 1:  # rank 1's disk stalls for 10 s in the middle of its write
        real = shardckpt.saving.write_blocks

        def stalled(*args: object, **kwargs: object) -> object:
            time.sleep(10)
            return real(*args, **kwargs)  # type: ignore[arg-type]

        shardckpt.saving.write_blocks = stalled  # type: ignore[assignment]
    t0 = time.monotonic()
    handle = shardckpt.async_save({"r": shardckpt.PerRank(torch.ones(64) * rank)}, path)
    outcome = _outcome(lambda: handle.wait(timeout=60))
    return outcome, time.monotonic() - t0


def test_a_stuck_peer_times_out_after_shardckpt_timeout_s(tmp_path):
    (o0, t0), (o1, _) = run_ranks(2, stuck_peer_worker, str(tmp_path / "c"), timeout=90)
    assert o0 == "CommunicationError" and t0 < 8, (o0, t0)  # after 3 s, not the stall, nor 30 minutes
    assert o1 != "ok"
    assert not (tmp_path / "c" / "index.json").exists()
