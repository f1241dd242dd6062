"""The memory tier (shardckpt.memtier) across simulated nodes: ranks name their node with
SHARDCKPT_NODE_ID, and a lost node is a node whose tier directory is wiped."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.memtier import MemoryTier, memory_restore, memory_save
from tests.dist.harness import run_ranks

ROWS, COLS = 12, 10


def _full(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(ROWS, COLS, generator=g), "b": torch.randn(COLS, generator=g)}


def _sharded(step: int, world: int) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = _full(step)
    return {
        "w": distribute_tensor(full["w"], mesh, [Shard(0)]),
        "b": distribute_tensor(full["b"], mesh, [Replicate()]),
        "step": step,
    }


def _tier(root: str, **kw: object) -> MemoryTier:
    return MemoryTier(root=root, job="t", **kw)  # type: ignore[arg-type]


def save_steps(rank: int, world: int, root: str, steps: list[int], per_node: int, kw: dict[str, object]) -> int:
    os.environ["SHARDCKPT_NODE_ID"] = f"n{rank // per_node}"
    for step in steps:
        memory_save(_sharded(step, world), step, _tier(root, **kw)).wait()
    return _tier(root, **kw).store().held_bytes()


def restore(rank: int, world: int, root: str, per_node: int, node_offset: int, newer_than: int | None = None) -> list[object]:
    return restore_on(rank, world, root, [f"n{r // per_node + node_offset}" for r in range(world)], newer_than)


def restore_on(rank: int, world: int, root: str, names: list[str], newer_than: int | None = None) -> list[object]:
    """Restore on rank ``rank`` of node ``names[rank]``, counting every file it opens."""
    node = names[rank]
    os.environ["SHARDCKPT_NODE_ID"] = node
    target = _sharded(0, world)
    target["step"] = -1
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    os.open = counting_open  # every file and directory the restore opens, storage included
    try:
        got = memory_restore(target, _tier(root), newer_than=newer_than)
    finally:
        os.open = real_open
    tier = os.path.join(root, "t")
    foreign = [p for p in opened if p.startswith(tier) and not p.startswith(os.path.join(tier, node))]
    assert not foreign, f"rank {rank} on {node} opened another node's tier: {foreign[:3]}"
    # The counter saw the reads (a node with no tier has nothing of its own to open).
    assert any(p.startswith(os.path.join(tier, node)) for p in opened) == os.path.isdir(os.path.join(tier, node))
    if got.step is None:
        return [None, got.reason, True]
    want = _sharded(got.step, world)
    same = all(
        torch.equal(target[k].to_local(), want[k].to_local()) for k in ("w", "b")  # type: ignore[union-attr]
    )
    return [got.step, got.reason, same and target["step"] == got.step]


def _wipe(root: Path, node: str) -> None:
    shutil.rmtree(root / "t" / node)


@pytest.mark.parametrize("wiped", [True, False])
def test_survivors_restore_from_memory_resharded_after_a_node_loss(tmp_path, wiped):
    run_ranks(4, save_steps, str(tmp_path), [10, 20], 2, {})
    # Each node holds its own two files and copies of the other node's two.
    for node in ("n0", "n1"):
        assert len(os.listdir(tmp_path / "t" / node / "step-00000020" / "data")) == 4
    if wiped:
        _wipe(tmp_path, "n1")
    # Node n1's ranks are gone; its tier may still be on this host (one host plays both nodes),
    # and the survivors must not open it either way (restore() counts their opens).
    for step, reason, same in run_ranks(2, restore, str(tmp_path), 2, 0):
        assert step == 20 and same, reason
        assert "n0" in reason


def test_both_holders_lost_falls_back_to_nothing_and_says_why(tmp_path):
    run_ranks(4, save_steps, str(tmp_path), [10], 2, {})
    # Node n0 survives but loses the copies it kept of n1's files (as if both holders died).
    data = tmp_path / "t" / "n0" / "step-00000010" / "data"
    for f in sorted(os.listdir(data))[2:]:
        os.remove(data / f)
    _wipe(tmp_path, "n1")
    for step, reason, _ in run_ranks(2, restore, str(tmp_path), 2, 0):
        assert step is None
        assert "step 10: no surviving node holds an intact copy" in reason


def test_a_step_missing_on_one_node_is_skipped_for_the_older_one(tmp_path):
    run_ranks(4, save_steps, str(tmp_path), [10, 20], 2, {})
    os.remove(tmp_path / "t" / "n1" / "step-00000020" / "index.json")  # step 20 never finished on n1
    for step, reason, same in run_ranks(4, restore, str(tmp_path), 2, 0):
        assert step == 10 and same
        assert "step 20: not whole on node(s) n1" in reason


def test_a_corrupt_copy_is_skipped_for_the_older_step(tmp_path):
    run_ranks(4, save_steps, str(tmp_path), [10, 20], 2, {})
    _wipe(tmp_path, "n1")
    data = tmp_path / "t" / "n0" / "step-00000020" / "data"
    victim = data / sorted(os.listdir(data))[3]  # a copy of one of n1's files
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF
    victim.write_bytes(bytes(raw))
    for step, reason, same in run_ranks(2, restore, str(tmp_path), 2, 0):
        assert step == 10 and same
        assert "step 20: a copy failed its check" in reason


def test_keep_last_bounds_the_tier_and_three_nodes_share_the_copies(tmp_path):
    sizes = run_ranks(3, save_steps, str(tmp_path), [1, 2, 3, 4], 1, {"keep_last": 2})
    for node in ("n0", "n1", "n2"):
        assert sorted(os.listdir(tmp_path / "t" / node)) == ["step-00000003", "step-00000004"]
    # What each node reports holding is what is under its directory: two steps, not four.
    for node, size in zip(("n0", "n1", "n2"), sizes):
        assert size == sum(f.stat().st_size for f in (tmp_path / "t" / node).rglob("*") if f.is_file()) > 0
    _wipe(tmp_path, "n2")
    for step, _reason, same in run_ranks(2, restore, str(tmp_path), 1, 0):
        assert step == 4 and same


def too_few_nodes(rank: int, world: int, root: str) -> str:
    os.environ["SHARDCKPT_NODE_ID"] = "only"
    try:
        memory_save(_sharded(1, world), 1, _tier(root))
    except shardckpt.CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def test_copies_on_other_nodes_need_other_nodes(tmp_path):
    for outcome in run_ranks(2, too_few_nodes, str(tmp_path)):
        assert outcome.startswith("StateMismatchError: 1 copy on other nodes need at least 2 nodes")


@pytest.mark.parametrize("replicas", [0])
def test_a_single_node_tier_without_copies(tmp_path, replicas):
    run_ranks(2, save_steps, str(tmp_path), [5], 2, {"replicas": replicas})
    for step, _reason, same in run_ranks(2, restore, str(tmp_path), 2, 0):
        assert step == 5 and same


def test_a_replacement_node_with_an_empty_tier_takes_part_and_reads_nothing_itself(tmp_path):
    run_ranks(4, save_steps, str(tmp_path), [10, 20], 2, {})
    _wipe(tmp_path, "n1")
    # n1 is gone; a fresh node n2 (no tier) joins the survivor n0. n2's ranks get the index from
    # n0 and every block from n0's ranks; restore_on checks they opened nothing under the tier.
    for step, reason, same in run_ranks(4, restore_on, str(tmp_path), ["n0", "n0", "n2", "n2"]):
        assert step == 20 and same, reason
    assert not (tmp_path / "t" / "n2").exists()


def test_a_node_that_holds_older_steps_only_is_no_replacement(tmp_path):
    run_ranks(4, save_steps, str(tmp_path), [10, 20], 2, {})
    os.remove(tmp_path / "t" / "n1" / "step-00000020" / "index.json")  # step 20 failed on n1
    # Asked for steps after 19 (the manager asks for those at least as new as the durable one),
    # n1 still says it holds step 10, so step 20 lacks a node: nothing to restore, not a crash.
    for step, reason, _ in run_ranks(4, restore, str(tmp_path), 2, 0, 19):
        assert step is None
        assert "step 20: not whole on node(s) n1" in reason


def test_an_index_that_differs_on_one_node_is_never_loaded(tmp_path):
    run_ranks(4, save_steps, str(tmp_path), [10, 20], 2, {})
    index = tmp_path / "t" / "n1" / "step-00000020" / "index.json"
    text = index.read_text()
    assert text.count('"value":20}') == 1
    index.write_text(text.replace('"value":20}', '"value":28}'))  # still a valid index
    for step, reason, same in run_ranks(4, restore, str(tmp_path), 2, 0):
        assert step == 10 and same, reason  # every rank loads the same older step
        assert "step 20: not whole on node(s) n1" in reason


def test_a_higher_step_left_by_an_earlier_run_is_removed_not_restored(tmp_path):
    run_ranks(4, save_steps, str(tmp_path), [100], 2, {})
    # A new run under the same job name saves from step 1: step 100 is not of its history.
    run_ranks(4, save_steps, str(tmp_path), [1, 2], 2, {"keep_last": 2})
    for node in ("n0", "n1"):
        assert sorted(os.listdir(tmp_path / "t" / node)) == ["step-00000001", "step-00000002"]
    for step, reason, same in run_ranks(4, restore, str(tmp_path), 2, 0):
        assert step == 2 and same, reason


def test_keep_last_counts_steps_whole_on_every_node(tmp_path):
    run_ranks(4, save_steps, str(tmp_path), [2, 3], 2, {"keep_last": 2})
    for node in ("n0", "n1"):  # step 3's save failed before it was recorded as whole anywhere
        os.remove(tmp_path / "t" / node / "step-00000003" / "tier.json")
    run_ranks(4, save_steps, str(tmp_path), [4], 2, {"keep_last": 2})
    for node in ("n0", "n1"):  # 2 and 4 are the two newest whole steps; 3 lies between them
        assert sorted(os.listdir(tmp_path / "t" / node)) == ["step-00000002", "step-00000003", "step-00000004"]
    for node in ("n0", "n1"):
        shutil.rmtree(tmp_path / "t" / node / "step-00000004")
    for step, reason, same in run_ranks(4, restore, str(tmp_path), 2, 0):
        assert step == 2 and same, reason


def test_saving_a_step_again_leaves_only_the_new_saves_files(tmp_path):
    run_ranks(4, save_steps, str(tmp_path), [20, 20, 20], 2, {})
    for node in ("n0", "n1"):
        assert len(os.listdir(tmp_path / "t" / node / "step-00000020" / "data")) == 4
    for step, reason, same in run_ranks(4, restore, str(tmp_path), 2, 0):
        assert step == 20 and same, reason


def save_into_link(rank: int, world: int, root: str) -> str:
    os.environ["SHARDCKPT_NODE_ID"] = f"n{rank // 2}"
    try:
        memory_save(_sharded(30, world), 30, _tier(root)).wait()
    except shardckpt.CheckpointError as e:
        return type(e).__name__
    return "saved"


def test_a_step_directory_that_is_a_link_is_refused_on_every_rank(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "t" / "n0").mkdir(parents=True)
    (tmp_path / "t" / "n0" / "step-00000030").symlink_to(outside)
    assert run_ranks(4, save_into_link, str(tmp_path)) == ["CheckpointIOError"] * 2 + ["RankFailedError"] * 2
    assert not list(outside.iterdir())
