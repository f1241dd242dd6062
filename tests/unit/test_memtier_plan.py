"""The memory tier's pure parts: the node map and partners, and the choice of the step to restore."""

from __future__ import annotations

import pytest

import shardckpt
from shardckpt.errors import StateMismatchError
from shardckpt.memtier import MemoryTier
from shardckpt.memtier.nodes import node_map
from shardckpt.memtier.restore import choose_step
from shardckpt.memtier.store import StepView


def test_partners_are_the_same_local_rank_on_the_next_nodes():
    nodes = node_map(["a", "a", "b", "b", "c", "c"])
    assert nodes.nodes == ("a", "b", "c")
    assert [nodes.partners(r, 1) for r in range(6)] == [[2], [3], [4], [5], [0], [1]]
    assert nodes.partners(1, 2) == [3, 5]
    with pytest.raises(StateMismatchError, match="3 copies on other nodes need at least 4 nodes"):
        nodes.partners(0, 3)


def test_uneven_nodes_wrap_the_local_index():
    nodes = node_map(["a", "a", "a", "b"])  # node b has one rank: it keeps every copy of a's files
    assert [nodes.partners(r, 1) for r in range(4)] == [[3], [3], [3], [0]]
    assert nodes.lead(1) == 3 and nodes.ranks_on(0) == [0, 1, 2]


def _view(step: int, save_id: str = "s", present: dict[str, int] | None = None, digest: str = "d") -> StepView:
    declared = {"f0": 10, "f1": 20}
    return StepView(step, save_id, f"{save_id}-{digest}", declared, declared if present is None else present)


def test_the_newest_step_every_node_holds_whole_is_chosen():
    nodes = node_map(["a", "b"])
    choice = choose_step(nodes, [{1: _view(1), 2: _view(2)}, {1: _view(1), 2: _view(2, present={"f1": 20})}])
    assert choice.step == 2 and choice.holders == {"f0": [0], "f1": [0, 1]} and not choice.skipped
    assert choice.file_readers(nodes) == {"f0": frozenset({0}), "f1": frozenset({0, 1})}


@pytest.mark.parametrize(
    ("second", "why"),
    [
        ({1: _view(1)}, "step 2: not whole on node(s) b"),
        ({1: _view(1), 2: _view(2, save_id="other")}, "step 2: the nodes hold different saves of it (other, s)"),
        ({1: _view(1), 2: _view(2, digest="flipped")}, "step 2: the nodes' indexes of it differ (a: s-d, b: s-flipped)"),
    ],
)
def test_a_step_missing_or_mixed_on_a_node_is_skipped(second, why):
    choice = choose_step(node_map(["a", "b"]), [{1: _view(1), 2: _view(2)}, second])
    assert choice.step == 1 and len(choice.skipped) == 1 and choice.skipped[0].startswith(why)


def test_a_file_with_no_intact_copy_skips_the_step():
    truncated = _view(2, present={"f0": 10, "f1": 19})
    choice = choose_step(node_map(["a"]), [{1: _view(1), 2: truncated}])
    assert choice.step == 1 and choice.skipped == ["step 2: no surviving node holds an intact copy of f1"]
    assert choose_step(node_map(["a"]), [{}]).step is None


def test_a_replacement_node_with_an_empty_tier_does_not_block_the_step():
    nodes = node_map(["a", "new"])
    choice = choose_step(nodes, [{1: _view(1), 2: _view(2)}, {}])
    assert choice.step == 2 and choice.holders == {"f0": [0], "f1": [0]}
    assert choice.file_readers(nodes) == {"f0": frozenset({0}), "f1": frozenset({0})}
    # A node that holds other steps but not this one does block it, even steps older than those
    # asked for: it is no replacement.
    assert choose_step(nodes, [{1: _view(1), 2: _view(2)}, {1: _view(1)}]).step == 1
    assert choose_step(nodes, [{1: _view(1), 2: _view(2)}, {1: _view(1)}], newer_than=1).step is None


def test_newer_than_bounds_the_candidates():
    views = [{1: _view(1), 2: _view(2), 3: _view(3)}, {1: _view(1), 2: _view(2), 3: _view(3)}]
    assert choose_step(node_map(["a", "b"]), views, newer_than=1).step == 3
    assert choose_step(node_map(["a", "b"]), views, newer_than=3).step is None


def test_a_manager_names_its_memory_tier_after_its_durable_root(tmp_path):
    tier = MemoryTier(root=str(tmp_path / "shm"))
    a, b = tier.for_root("/data/run-a/ckpt"), tier.for_root("/data/run-b/ckpt")
    assert a.job != b.job and a.job.startswith("ckpt-") and a == tier.for_root("/data/run-a/ckpt")
    assert tier.for_root("s3://bucket/runs/exp1/").job.startswith("exp1-")
    assert MemoryTier(job="mine").for_root("/data/run-a/ckpt").job == "mine"
    assert tier.store("n").root.name == "default"  # memory_save and memory_restore alone
    manager = shardckpt.CheckpointManager(tmp_path / "ckpt", memory=tier)
    try:
        assert manager.memory == tier.for_root(str(tmp_path / "ckpt"))
    finally:
        manager.close()
