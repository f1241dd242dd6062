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
    ("case", "errors"),
    [
        ("shape", ["StateMismatchError", "StateMismatchError"]),
        ("unsupported", ["RankFailedError", "StateMismatchError"]),
        ("replica", ["ReplicaMismatchError", "RankFailedError"]),
        ("value", ["ReplicaMismatchError", "ReplicaMismatchError"]),
    ],
)
def test_bad_save_raises_on_every_rank_and_keeps_previous(tmp_path, case, errors):
    path = str(tmp_path / "ckpt")
    assert run_ranks(2, save_case, path, "good") == ["ok", "ok"]
    before = open(os.path.join(path, "index.json"), "rb").read()
    outcomes = run_ranks(2, save_case, path, case)
    assert [o.split(":")[0] for o in outcomes] == errors, outcomes
    assert all("w" in o or "step" in o or "bad" in o or "rank" in o for o in outcomes), outcomes
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
    ("case", "errors"),
    [
        ("shape", ["RankFailedError", "StateMismatchError"]),
        ("dtype", ["StateMismatchError", "RankFailedError"]),
        ("missing", ["RankFailedError", "MissingKeysError"]),
        ("gone", ["RankFailedError", "CheckpointNotFoundError"]),
    ],
)
def test_bad_load_raises_on_every_rank(tmp_path, case, errors):
    path = str(tmp_path / "ckpt")
    assert run_ranks(2, save_case, path, "good") == ["ok", "ok"]
    outcomes = run_ranks(2, load_case, path, case)
    assert [o.split(":")[0] for o in outcomes] == errors, outcomes
    failing = errors.index(next(e for e in errors if e != "RankFailedError"))
    assert "'w'" in outcomes[failing] or "extra" in outcomes[failing] or "nowhere" in outcomes[failing]
