"""When one rank fails, every rank raises a CheckpointError (never a hang), and nothing commits."""

from __future__ import annotations

import os

import pytest
import torch

import shardckpt
from tests.dist.harness import run_ranks


def _outcome(fn) -> str:
    try:
        fn()
    except shardckpt.CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def save_case(rank: int, world_size: int, path: str, case: str) -> str:
    state: dict[str, object] = {"w": torch.arange(6.0).reshape(2, 3), "step": 5}
    if case == "shape" and rank == 1:
        state["w"] = torch.zeros(3, 3)
    elif case == "unsupported" and rank == 1:
        state["bad"] = {1, 2}
    elif case == "replica" and rank == 1:
        state["w"] = torch.arange(6.0).reshape(2, 3) + 1
    elif case == "value" and rank == 1:
        state["step"] = 6
    return _outcome(lambda: shardckpt.save(state, path))


@pytest.mark.parametrize(
    ("case", "errors", "cause"),
    [
        ("shape", ["StateMismatchError", "StateMismatchError"], "tensor 'w' differs between ranks"),
        ("unsupported", ["RankFailedError", "StateMismatchError"], "value at key 'bad' has type set"),
        ("replica", ["ReplicaMismatchError", "RankFailedError"], "plain tensor 'w' holds different values on rank 0 and rank 1"),
        ("value", ["ReplicaMismatchError", "ReplicaMismatchError"], "value 'step' differs between rank 0 (5) and rank 1 (6)"),
    ],
)
def test_bad_save_raises_on_every_rank_and_keeps_previous(tmp_path, case, errors, cause):
    path = str(tmp_path / "ckpt")
    assert run_ranks(2, save_case, path, "good") == ["ok", "ok"]
    before = open(os.path.join(path, "index.json"), "rb").read()
    outcomes = run_ranks(2, save_case, path, case)
    assert [o.split(":")[0] for o in outcomes] == errors, outcomes
    # Every rank names the same cause, key included: a peer's RankFailedError carries the failing
    # rank's message, not just "rank 1 failed".
    assert all(cause in o for o in outcomes), outcomes
    # The committed checkpoint is untouched and still whole.
    assert open(os.path.join(path, "index.json"), "rb").read() == before
    shardckpt.verify(path)
    state = {"w": torch.zeros(2, 3), "step": 0}
    shardckpt.load(state, path)
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3)) and state["step"] == 5


def per_rank_save(rank: int, world_size: int, path: str) -> str:
    state = {"rng": shardckpt.PerRank(torch.full((3,), float(rank))), "pos": shardckpt.PerRank(rank * 10)}
    return _outcome(lambda: shardckpt.save(state, path))


def per_rank_load(rank: int, world_size: int, path: str) -> tuple[str, float, int]:
    state: dict[str, object] = {"rng": shardckpt.PerRank(torch.zeros(3)), "pos": shardckpt.PerRank(-1)}
    outcome = _outcome(lambda: shardckpt.load(state, path))
    rng, pos = state["rng"], state["pos"]
    assert isinstance(rng, shardckpt.PerRank) and isinstance(pos, shardckpt.PerRank)
    return outcome.split(":")[0], float(rng.value[0]), int(pos.value)


def test_per_rank_values_round_trip_to_each_rank(tmp_path):
    path = str(tmp_path / "ckpt")
    assert run_ranks(2, per_rank_save, path) == ["ok", "ok"]
    assert run_ranks(2, per_rank_load, path) == [("ok", 0.0, 0), ("ok", 1.0, 10)]
    # A third rank has no saved value of its own: it says so, and the others raise with it.
    outcomes = run_ranks(3, per_rank_load, path)
    assert [o[0] for o in outcomes] == ["RankFailedError", "RankFailedError", "MissingKeysError"]


def load_case(rank: int, world_size: int, path: str, case: str) -> str:
    state: dict[str, object] = {"w": torch.zeros(2, 3), "step": 0}
    if case == "shape" and rank == 1:
        state["w"] = torch.zeros(3, 2)
    elif case == "dtype" and rank == 0:
        state["w"] = torch.zeros(2, 3, dtype=torch.float16)
    elif case == "missing" and rank == 1:
        state["extra"] = torch.zeros(1)
    elif case == "gone" and rank == 1:
        path = path + "-nowhere"
    return _outcome(lambda: shardckpt.load(state, path))


@pytest.mark.parametrize(
    ("case", "errors", "cause"),
    [
        ("shape", ["RankFailedError", "StateMismatchError"], "tensor 'w' on rank 1: the checkpoint holds float32[2, 3], "
         "the target is float32[3, 2]"),
        ("dtype", ["StateMismatchError", "RankFailedError"], "tensor 'w' on rank 0: the checkpoint holds float32[2, 3], "
         "the target is float16[2, 3]"),
        ("missing", ["RankFailedError", "MissingKeysError"], "rank 1: keys not in the checkpoint: 'extra'"),
        ("gone", ["RankFailedError", "CheckpointNotFoundError"], "no checkpoint at {path}-nowhere"),
    ],
)
def test_bad_load_raises_on_every_rank(tmp_path, case, errors, cause):
    path = str(tmp_path / "ckpt")
    assert run_ranks(2, save_case, path, "good") == ["ok", "ok"]
    outcomes = run_ranks(2, load_case, path, case)
    assert [o.split(":")[0] for o in outcomes] == errors, outcomes
    # The failing rank's own message, on both ranks.
    assert all(cause.format(path=path) in o for o in outcomes), outcomes


def interrupted_after_writing(rank: int, world_size: int, path: str) -> str:
    from shardckpt.storage import faults

    os.environ["RANK"] = str(rank)  # whom "@1" names
    faults.configure("written:1:exit@1")  # SystemExit on rank 1 once its write reached every rank
    try:
        return _outcome(lambda: shardckpt.save({"w": shardckpt.PerRank(torch.arange(6.0) + rank)}, path))
    except SystemExit:
        return "exit"
    finally:
        faults.configure("")


def test_an_interrupt_after_a_ranks_write_was_reported_never_deletes_its_file(tmp_path):
    # Rank 1 is interrupted (Ctrl-C, a preemption's SystemExit) right after its write was
    # reported: the coordinator may already commit an index that names rank 1's file, so the
    # interrupted rank must leave it. Before, it deleted it, and the committed step was broken.
    path = str(tmp_path / "ckpt")
    outcomes = run_ranks(2, interrupted_after_writing, path)
    assert outcomes[1] == "exit", outcomes
    if os.path.exists(os.path.join(path, "index.json")):  # the coordinator committed it
        shardckpt.verify(path)
        assert len(os.listdir(os.path.join(path, "data"))) == 2
    else:
        assert outcomes[0].startswith("CommunicationError"), outcomes
