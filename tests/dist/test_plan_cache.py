"""A repeated save reuses its plan (plan_exchange.py) only while every rank's structure is unchanged,
and metadata that grows with the world goes to the coordinator only."""

from __future__ import annotations

import pytest
import torch

import shardckpt
from tests.dist.harness import run_ranks


def _per_rank_state(rank: int, rows: int) -> dict[str, object]:
    return {
        "w": torch.arange(12.0).reshape(4, 3),
        "mine": shardckpt.PerRank(torch.full((rows, 2), float(rank))),
        "step": 0,
    }


def repeated_saves(rank: int, world: int, path: str) -> list[object]:
    reused = []
    for i, rows in enumerate([3, 3, 3, 5 if rank == 1 else 3, 5 if rank == 1 else 3]):
        state = _per_rank_state(rank, rows)
        state["step"] = i
        reused.append(shardckpt.save(state, f"{path}/{i}").plan_reused)
    loaded = []
    for i, rows in enumerate([3, 3, 3, 5 if rank == 1 else 3]):
        target = _per_rank_state(rank, rows)
        target["mine"] = shardckpt.PerRank(torch.zeros(rows, 2))
        shardckpt.load(target, f"{path}/{i}")
        mine = target["mine"].value  # type: ignore[union-attr]
        loaded.append(bool(torch.equal(mine, torch.full((rows, 2), float(rank)))) and target["step"] == i)
    return [reused, loaded]


def test_repeated_saves_reuse_the_plan_until_one_rank_changes_shape(tmp_path):
    results = run_ranks(2, repeated_saves, str(tmp_path))
    for reused, loaded in results:
        # The first save plans, the next two reuse it; rank 1's PerRank tensor grows: every rank
        # plans again (a stale plan would write 3 rows of 5), then the new plan is reused.
        assert reused == [False, True, True, False, True]
        assert loaded == [True, True, True, True]


def diverged_caches(rank: int, world: int, path: str) -> list[bool]:
    from shardckpt import plan_exchange

    state = _per_rank_state(rank, 3)
    reused = [shardckpt.save(state, f"{path}/a").plan_reused]
    if rank == 2:
        plan_exchange._CACHE.clear()  # this rank alone lost its plan: every rank must plan again
    reused.append(shardckpt.save(state, f"{path}/b").plan_reused)
    reused.append(shardckpt.save(state, f"{path}/c").plan_reused)
    return reused


def test_a_rank_without_the_cached_plan_makes_every_rank_plan_again(tmp_path):
    assert run_ranks(3, diverged_caches, str(tmp_path), timeout=120) == [[False, False, True]] * 3
    assert shardckpt.verify(str(tmp_path / "b")).tensors == 4  # w and three ranks' "mine"


def value_collides_after_a_cached_plan(rank: int, world: int, path: str) -> list[str]:
    # Rank 0 holds a per-rank tensor "x"; rank 1 has no "x". Once the plan is cached, rank 1 names a
    # value "x": its tensor metadata is unchanged, so the collision must be caught without replanning.
    state: dict[str, object] = {"w": torch.ones(4)}
    if rank == 0:
        state["x"] = shardckpt.PerRank(torch.zeros(2))
    outcomes = []
    for i in range(3):
        if i == 2 and rank == 1:
            state["x"] = shardckpt.PerRank(7)
        try:
            shardckpt.save(state, f"{path}/{i}")
            outcomes.append("ok")
        except shardckpt.CheckpointError as e:
            outcomes.append(f"{type(e).__name__}: {e}")
    return outcomes


def test_a_value_named_like_another_ranks_tensor_is_refused_on_every_rank_with_a_cached_plan(tmp_path):
    for outcomes in run_ranks(2, value_collides_after_a_cached_plan, str(tmp_path)):
        assert outcomes[:2] == ["ok", "ok"]
        assert outcomes[2].startswith("StateMismatchError: key 'x' is a tensor on some ranks but a value on rank 1")
    assert not (tmp_path / "2" / "index.json").exists()


def gather_and_scatter(rank: int, world: int) -> list[object]:
    import torch.distributed as dist

    from shardckpt.dist import Comm

    comm = Comm(dist.group.WORLD)
    got = comm.gather({"rank": rank, "blob": "x" * (rank * 1000)})
    side = comm.side_group().gather([rank] * (rank + 1))
    mine = comm.scatter([{"to": r} for r in range(world)] if rank == 0 else None)
    _, to_coord = comm.run("a test", lambda: (None, rank * 10), to_coordinator=True)
    return [got, side, mine, to_coord]


def test_gathers_reach_the_coordinator_only():
    results = run_ranks(3, gather_and_scatter)
    assert results[0][0] == [{"rank": r, "blob": "x" * (r * 1000)} for r in range(3)]
    assert results[0][1] == [[0], [1, 1], [2, 2, 2]]
    assert results[0][3] == [0, 10, 20]
    for rank, (got, side, mine, to_coord) in enumerate(results):
        assert mine == {"to": rank}
        if rank:
            assert got is None and side is None and to_coord == []


@pytest.mark.parametrize("failing", [0, 2])
def test_a_failure_before_a_gather_to_the_coordinator_reaches_every_rank(failing):
    results = run_ranks(3, _fail_on, failing)
    for rank, outcome in enumerate(results):
        if rank == failing:
            assert outcome.startswith("CheckpointIOError: a test failed on rank")
        else:
            assert outcome.startswith(f"RankFailedError: a test failed on rank(s) [{failing}]")


def _fail_on(rank: int, world: int, failing: int) -> str:
    import torch.distributed as dist

    from shardckpt.dist import Comm

    def fn() -> tuple[None, object]:
        if rank == failing:
            raise OSError("disk on fire")
        return None, rank

    try:
        Comm(dist.group.WORLD).run("a test", fn, to_coordinator=True)
    except shardckpt.CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def values_on_a_cached_plan(rank: int, world: int, path: str) -> list[object]:
    # Saves 1 and 2 reuse save 0's plan, agreed by a vote: no gather before the write, so each
    # rank's values reach the index with its write results.
    outcomes: list[object] = []
    for i in range(4):
        state = {"w": torch.ones(4), "step": i if i < 3 or rank == 0 else 99, "mine": shardckpt.PerRank(10 * i + rank)}
        try:
            outcomes.append(shardckpt.save(state, f"{path}/{i}").plan_reused)
        except shardckpt.CheckpointError as e:
            outcomes.append(type(e).__name__)
    loaded = []
    for i in range(3):
        target: dict[str, object] = {"w": torch.zeros(4), "step": -1, "mine": shardckpt.PerRank(-1)}
        shardckpt.load(target, f"{path}/{i}")
        loaded.append([target["step"], target["mine"].value])  # type: ignore[union-attr]
    return [outcomes, loaded]


def test_values_of_a_save_that_reuses_its_plan(tmp_path):
    for rank, (outcomes, loaded) in enumerate(run_ranks(2, values_on_a_cached_plan, str(tmp_path))):
        # Save 3: rank 1's step differs from rank 0's. The vote sees it and the ranks gather, so
        # every rank raises the same error, before anything is written.
        assert outcomes == [False, True, True, "ReplicaMismatchError"]
        assert loaded == [[i, 10 * i + rank] for i in range(3)]
    assert not (tmp_path / "3").exists() or not (tmp_path / "3" / "index.json").exists()


def different_cached_plans(rank: int, world: int, path: str) -> list[bool]:
    from shardckpt import plan_exchange

    state = {"w": torch.ones(4), "step": 0}
    reused = [shardckpt.save(state, f"{path}/a").plan_reused]
    if rank == 1:
        # This rank's cache names a plan made with another rank 0: its own fingerprint matches,
        # but the ranks do not hold the same plan, so they must not reuse it.
        import torch.distributed as dist

        from shardckpt.dist import Comm
        from shardckpt.options import compression_options

        key = plan_exchange._key(Comm(dist.group.WORLD))
        cached = plan_exchange._CACHE[key]
        fps = ("0" * 32, *cached.fps[1:])
        token = plan_exchange._token(list(fps), compression_options("auto").block_bytes, world)
        plan_exchange._CACHE[key] = plan_exchange._Cached(token, fps, cached.share, cached.plan)
    reused.append(shardckpt.save(state, f"{path}/b").plan_reused)
    reused.append(shardckpt.save(state, f"{path}/c").plan_reused)
    return reused


def test_ranks_holding_different_cached_plans_plan_again(tmp_path):
    assert run_ranks(2, different_cached_plans, str(tmp_path)) == [[False, False, True]] * 2
    assert shardckpt.verify(str(tmp_path / "b")).tensors == 1


def ballot_fails(rank: int, world: int, path: str) -> list[str]:
    from shardckpt import saving

    outcomes = []
    for i in range(2):
        if i == 1 and rank == 1:
            def broken(*args: object) -> list[int]:
                raise RuntimeError("ballot box on fire")

            saving.ballot = broken  # type: ignore[assignment]
        try:
            shardckpt.save({"w": torch.ones(4), "step": i}, f"{path}/{i}")
            outcomes.append("ok")
        except shardckpt.CheckpointError as e:
            outcomes.append(f"{type(e).__name__}: {e}")
    return outcomes


def test_a_rank_that_cannot_vote_fails_every_rank_without_a_hang(tmp_path):
    first, second = run_ranks(2, ballot_fails, str(tmp_path), timeout=60)
    assert first[0] == second[0] == "ok"
    assert second[1].startswith("CheckpointError") and "ballot box on fire" in second[1]
    assert first[1].startswith("RankFailedError") and "rank(s) [1]" in first[1]
    assert not (tmp_path / "1" / "index.json").exists()


# An async save takes its cached plan before the vote on it returns and stages with it; the vote
# is settled after the snapshot (saving.settle_vote). These three break that bet on purpose.


def _uneven_state(rank: int, step: int, grown: bool) -> dict[str, object]:
    # Planning gives the replicated "w" (48 bytes) to the less loaded rank, after the larger
    # per-rank tensors: rank 1 while its "a" is smaller than rank 0's, rank 0 once it grows.
    size = 25 if rank == 0 else (250 if grown else 2)
    return {
        "w": torch.arange(12.0).reshape(4, 3) + step,
        "a": shardckpt.PerRank(torch.full((size,), float(10 * step + rank))),
        "step": step,
    }


def staged_ahead_then_replanned(rank: int, world: int, path: str) -> list[object]:
    import importlib

    async_save = importlib.import_module("shardckpt.async_save")  # the module, not the function
    ahead: list[bool] = []  # per stage() call: was the vote still open (the plan not yet confirmed)?
    real_stage = async_save.stage

    def stage(prep, *args, **kwargs):  # type: ignore[no-untyped-def]
        ahead.append(prep.vote is not None)
        return real_stage(prep, *args, **kwargs)

    async_save.stage = stage  # type: ignore[assignment]
    reused = []
    for step in range(4):
        state = _uneven_state(rank, step, grown=step >= 2)
        reused.append(shardckpt.async_save(state, f"{path}/{step}").wait(timeout=60).plan_reused)
    loaded = []
    for step in range(4):
        target = _uneven_state(rank, -1, grown=step >= 2)
        shardckpt.load(target, f"{path}/{step}")
        expected = _uneven_state(rank, step, grown=step >= 2)
        loaded.append(
            torch.equal(target["w"], expected["w"])  # type: ignore[arg-type]
            and torch.equal(target["a"].value, expected["a"].value)  # type: ignore[union-attr]
            and target["step"] == step
        )
    return [reused, loaded, ahead]


def test_an_async_save_staged_with_a_plan_the_vote_rejects_stages_again(tmp_path):
    # Save 2: rank 0's structure is unchanged, so it stages with the cached plan, in which rank 1
    # writes "w". Rank 1's grew: the ranks plan anew and "w" moves to rank 0, which must stage
    # again (with the old staging, "w" of step 2 would be missing or step 1's).
    first, second = run_ranks(2, staged_ahead_then_replanned, str(tmp_path))
    for reused, loaded, _ in (first, second):
        assert reused == [False, True, False, True]
        assert loaded == [True] * 4
    # Save 0 has no cached plan; rank 1 cannot reuse it in save 2; rank 0 stages save 2 twice.
    assert first[2] == [False, True, True, False, True]
    assert second[2] == [False, True, False, True]
    for step in range(4):
        assert shardckpt.verify(str(tmp_path / str(step))).tensors == 3


def peer_fails_before_the_vote(rank: int, world: int, path: str) -> list[str]:
    outcomes = []
    for step in range(3):
        state: dict[str, object] = {"w": torch.ones(4) * step, "step": step}
        if step == 1 and rank == 1:
            state["bad"] = {1, 2}  # a set cannot be stored: this rank fails while flattening
        try:
            shardckpt.async_save(state, f"{path}/{step}").wait(timeout=60)
            outcomes.append("ok")
        except shardckpt.CheckpointError as e:
            outcomes.append(type(e).__name__)
    return outcomes


def test_a_rank_failing_while_its_peer_stages_ahead_of_the_vote_fails_both_without_a_hang(tmp_path):
    # Rank 0 stages save 1 ahead of its vote, which then says rank 1 failed: both raise, and
    # rank 0's background must not wait in a write gather that rank 1 never joins.
    first, second = run_ranks(2, peer_fails_before_the_vote, str(tmp_path), timeout=90)
    assert first == ["ok", "RankFailedError", "ok"]
    assert second == ["ok", "StateMismatchError", "ok"]
    assert not (tmp_path / "1" / "index.json").exists()
    assert shardckpt.verify(str(tmp_path / "2")).tensors == 1


def staging_fails_while_the_vote_replans(rank: int, world: int, path: str) -> list[str]:
    from shardckpt.storage import faults

    outcomes = []
    for step in range(4):
        state = _uneven_state(rank, step, grown=step >= 2)
        if step == 2 and rank == 0:
            faults.configure("stage:1:eio")
        try:
            shardckpt.async_save(state, f"{path}/{step}").wait(timeout=60)
            outcomes.append("ok")
        except shardckpt.CheckpointError as e:
            outcomes.append(type(e).__name__)
        faults.configure("")
    return outcomes


def test_a_staging_failure_ahead_of_a_vote_that_replans_joins_the_gather(tmp_path):
    # Save 2: rank 0 stages ahead of the vote and fails; rank 1's structure changed, so the vote
    # calls for a gather. Rank 0 must bring its failure there, not to the write gather.
    first, second = run_ranks(2, staging_fails_while_the_vote_replans, str(tmp_path), timeout=90)
    assert first[2] != "ok" and second[2] == "RankFailedError"
    assert first[:2] == second[:2] == ["ok", "ok"] and first[3] == second[3] == "ok"
    assert not (tmp_path / "2" / "index.json").exists()
    assert shardckpt.verify(str(tmp_path / "3")).tensors == 3
