"""The fault matrix (tests/faults/test_fault_matrix.py) on S3, for a chosen subset of its cases: a
CheckpointManager at 2 real gloo ranks saving into an s3:// root on the moto server, one fault armed
on one rank in step 2's save. The points are those where S3 behaves differently from a directory:
the data upload, the index PUT that is the commit, the fault points that stand for the rename and
the directory fsync S3 does not have, and retention's deletes. A failed upload completion is in
tests/faults/test_async_backends.py. The full matrix (~117 cases of a few seconds) stays local:
its other points fail before any storage call (flatten, stage, the gathers) or in the same calls.

After each case, from outside: no rank hung, the ranks that lived raised unless the fault came
after the commit, every step ``committed_steps`` lists verifies and loads bit-exactly as the step
it claims to be, step 1 is still there unless step 2 committed, and no torn step is listed.
"""

from __future__ import annotations

import os

import pytest
import torch

import shardckpt
from tests.backends import MotoS3
from tests.dist.harness import run_ranks
from tests.faults.test_fault_matrix import AFTER_COMMIT, COLS, GATHER_NTH, ROWS, _full, case_worker

pytestmark = pytest.mark.timeout(120)

CASES = [
    ("write", 1, "eio"),  # a part upload fails on the rank that is not the coordinator
    ("write", 1, "kill"),  # ... or that rank dies mid-upload
    ("gather:commit", 0, "kill"),  # the coordinator dies before its index PUT
    ("index_write", 0, "eio"),  # the commit PUT fails
    ("rename", 0, "kill"),  # where the local rename would be: nothing is visible yet
    ("dir_fsync", 0, "eio"),  # after the PUT: the step is committed
    ("retention", 0, "eio"),  # retention cannot delete step 1: both stay, both complete
]


def _worker(rank: int, world_size: int, env: dict[str, str], root: str, spec: str, victim: int) -> str:
    os.environ.update(env)  # the forkserver's children do not see the test's environment
    return case_worker(rank, world_size, root, "manager", spec, victim)


@pytest.mark.parametrize(("point", "victim", "action"), CASES)
def test_fault_on_s3(s3_env: MotoS3, s3_prefix: str, point: str, victim: int, action: str):
    root = s3_env.url(s3_prefix, "run")
    name, _, _ = point.partition(":")
    nth = GATHER_NTH["manager"][point] if name == "gather" else 1
    dies = frozenset({victim}) if action == "kill" else frozenset()
    outcomes = run_ranks(2, _worker, s3_env.env(), root, f"{name}:{nth}:{action}", victim, timeout=90, dies=dies)
    listed = shardckpt.committed_steps(root)
    assert listed, "no committed checkpoint is left"
    for step in listed:
        path = f"{root}/step-{step:08d}"
        assert shardckpt.verify(path).tensors == 2
        got: dict[str, object] = {"w": torch.zeros(ROWS, COLS), "b": torch.zeros(COLS, dtype=torch.bfloat16), "step": -1}
        shardckpt.load(got, path)
        want = _full(step)
        assert got["step"] == step and torch.equal(got["w"], want["w"])  # type: ignore[arg-type]
        assert torch.equal(got["b"].view(torch.int16), want["b"].view(torch.int16))  # type: ignore[union-attr]
    assert 2 in listed or 1 in listed, "the previous committed step was lost"
    for rank, outcome in enumerate(outcomes):
        if rank not in dies:
            if name in AFTER_COMMIT:
                assert outcome == "ok", (rank, outcome)
            else:
                assert outcome != "ok", f"rank {rank} did not raise ({outcomes})"
    if name == "dir_fsync" or name in AFTER_COMMIT:
        assert 2 in listed  # failures after the index PUT never take a committed step away
    if name == "retention":
        assert listed == [1, 2]
    # A restarted job: its first save removes what the fault left (a torn step 2, or step 1 that
    # retention drops), and the root then holds exactly the committed steps.
    manager = shardckpt.CheckpointManager(root, keep_last=1, async_save=False)
    manager.save(3, {"w": torch.zeros(4), "step": 3})
    manager.close()
    assert manager.steps() == [3]
    assert shardckpt.committed_steps(root) == [3]
    from shardckpt.storage import open_storage

    assert open_storage(root).list_dirs() == ["step-00000003"]
