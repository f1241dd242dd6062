"""CheckpointManager with a memory tier in front of durable storage, over two simulated nodes."""

from __future__ import annotations

import os
import shutil

import torch

import shardckpt
from shardckpt.memtier import MemoryTier
from tests.dist.harness import run_ranks
from tests.dist.test_memory_tier import _sharded


def _manager(root: str, world: int) -> shardckpt.CheckpointManager:
    memory = MemoryTier(root=os.path.join(root, "mem"), job="t", every=1, keep_last=2)
    return shardckpt.CheckpointManager(os.path.join(root, "durable"), save_interval=4, memory=memory)


def train(rank: int, world: int, root: str, steps: int) -> list[int]:
    os.environ["SHARDCKPT_NODE_ID"] = f"n{rank // 2}"
    manager = _manager(root, world)
    for step in range(1, steps + 1):
        manager.save(step, _sharded(step, world))
    manager.close()
    return manager.steps()


def resume(rank: int, world: int, root: str) -> list[object]:
    os.environ["SHARDCKPT_NODE_ID"] = "n0"
    durable = os.path.realpath(os.path.join(root, "durable"))
    reads: list[str] = []
    real_open = os.open

    def counting_open(path, flags, *args, dir_fd=None, **kwargs):  # type: ignore[no-untyped-def]
        full = os.fspath(path)
        if dir_fd is not None:
            full = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), full)
        if full.startswith(durable) and os.path.basename(full) != os.path.basename(durable):
            reads.append(full)
        return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    manager = _manager(root, world)
    target = _sharded(0, world)
    os.open = counting_open
    try:
        step = manager.restore(target)
    finally:
        os.open = real_open
        manager.close()
    report = manager.last_restore
    assert report is not None and report.step == step
    want = _sharded(step or 0, world)
    same = all(torch.equal(target[k].to_local(), want[k].to_local()) for k in ("w", "b"))  # type: ignore[union-attr]
    return [step, report.tier, report.reason, same and target["step"] == step, reads]


def test_after_a_node_loss_the_survivors_restore_the_newest_step_from_memory(tmp_path):
    for steps in run_ranks(4, train, str(tmp_path), 6):
        assert steps == [4]
    shutil.rmtree(tmp_path / "mem" / "t" / "n1")  # the lost node's memory goes with it
    results = run_ranks(2, resume, str(tmp_path))
    for step, tier, reason, same, reads in results:
        assert (step, tier, same) == (6, "memory", True), reason
        # Under the durable root only directories were opened (listing which steps are
        # committed): no index and no data file was read.
        assert not [r for r in reads if not os.path.isdir(r)], reads
    assert results[0][4]  # the coordinator's listing was seen: the counter works


def test_when_both_holders_are_lost_restore_falls_back_to_durable_and_says_so(tmp_path):
    run_ranks(4, train, str(tmp_path), 6)
    shutil.rmtree(tmp_path / "mem" / "t" / "n1")
    # n0's copies of n1's files go too: for n1's files both holders are gone.
    for step_dir in (tmp_path / "mem" / "t" / "n0").glob("step-*"):
        for f in sorted((step_dir / "data").iterdir())[2:]:
            f.unlink()
    for step, tier, reason, same, _reads in run_ranks(2, resume, str(tmp_path)):
        assert (step, tier, same) == (4, "durable", True)
        assert reason.startswith("the memory tier has no usable step at least as new as the durable one")
        assert "no surviving node holds an intact copy" in reason
