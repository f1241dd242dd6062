"""Every phase of a save, broken on every rank, by an exception and by SIGKILL, for save,
async_save and CheckpointManager, at 2 real gloo ranks.

Each case saves step 1 cleanly, arms one fault on one rank, saves step 2 (the manager also closes,
which runs retention), and then checks from outside:
- no rank hung (the run has a deadline), and every rank that lived raised a CheckpointError,
  except where the fault comes after a commit whose outcome every rank already knows;
- every committed step that is listed verifies, with no orphaned file named by any index, and
  loads bit-exactly as the step it claims to be;
- step 1 is still there unless step 2 committed (and retention was then free to drop step 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.storage import faults
from tests.dist.harness import run_ranks

pytestmark = pytest.mark.timeout(120)

ROWS, COLS = 64, 48
# Points reached on every rank, and those only the coordinator (rank 0) reaches.
EVERY_RANK = ["flatten", "vote", "stage", "write", "fsync", "data_dir_fsync", "gather:write", "gather:commit"]
COORDINATOR = ["index_write", "rename", "dir_fsync"]
# Which pass of "gather" (counted from the start of the step-2 save) is the write-results gather
# and which the commit gather. Step 2 reuses step 1's plan, agreed by a vote, so the write's own
# two gathers (the outcome to every rank, the block records to the coordinator) come first; the
# manager first runs its housekeeping gather.
GATHER_NTH = {
    "save": {"gather:write": 2, "gather:commit": 3},
    "async_save": {"gather:write": 2, "gather:commit": 3},
    "manager": {"gather:write": 3, "gather:commit": 4},
}
# After these, the save is committed and every rank knows it: the save itself may succeed.
AFTER_COMMIT = {"cleanup", "retention"}


def _full(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(ROWS, COLS, generator=g), "b": torch.randn(COLS, generator=g).to(torch.bfloat16)}


def _state(step: int) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    full = _full(step)
    mesh = init_device_mesh("cpu", (2,))
    return {"w": distribute_tensor(full["w"], mesh, [Shard(0)]), "b": full["b"], "step": step}


def _save(mode: str, root: str, step: int, manager: shardckpt.CheckpointManager | None) -> None:
    if mode == "save":
        shardckpt.save(_state(step), os.path.join(root, "ckpt"), metadata={"step": step})
    elif mode == "async_save":
        shardckpt.async_save(_state(step), os.path.join(root, "ckpt"), metadata={"step": step}).wait(timeout=60)
    else:
        assert manager is not None
        manager.save(step, _state(step))
        manager.wait()


def case_worker(rank: int, world_size: int, root: str, mode: str, spec: str, victim: int) -> str:
    manager = shardckpt.CheckpointManager(root, keep_last=1) if mode == "manager" else None
    _save(mode, root, 1, manager)
    if rank == victim:
        faults.configure(spec)
    try:
        _save(mode, root, 2, manager)
        if manager is not None:
            manager.close()
        outcome = "ok"
    except shardckpt.CheckpointError as e:
        outcome = type(e).__name__
    except SystemExit:
        outcome = "SystemExit"
    finally:
        faults.configure("")
    shardckpt.shutdown()
    return outcome


def _committed(root: Path, mode: str) -> dict[int, Path]:
    if mode == "manager":
        return {s: root / f"step-{s:08d}" for s in shardckpt.committed_steps(root)}
    path = root / "ckpt"
    if not (path / "index.json").exists():
        return {}
    step = shardckpt.read_index(path).metadata["step"]
    assert isinstance(step, int)
    return {step: path}


def _check_storage(root: Path, mode: str) -> dict[int, Path]:
    listed = _committed(root, mode)
    assert listed, "no committed checkpoint is left"
    for step, path in listed.items():
        report = shardckpt.verify(path)
        assert report.tensors == 2
        got: dict[str, object] = {"w": torch.zeros(ROWS, COLS), "b": torch.zeros(COLS, dtype=torch.bfloat16), "step": -1}
        shardckpt.load(got, path)
        want = _full(step)
        assert got["step"] == step
        assert torch.equal(got["w"], want["w"]) and torch.equal(got["b"].view(torch.int16), want["b"].view(torch.int16))  # type: ignore[union-attr]
    if 2 not in listed:
        assert 1 in listed, "the previous committed step was lost"
    return listed


def _cases() -> list[tuple[str, str, int, str]]:
    out = []
    for mode in ("save", "async_save", "manager"):
        late = ["cleanup"] if mode != "manager" else ["retention"]
        for action in ("eio", "kill"):
            for point in EVERY_RANK:
                out += [(mode, point, victim, action) for victim in (0, 1)]
            out += [(mode, point, 0, action) for point in COORDINATOR + late]
    # A preemption handler's sys.exit() in the middle of a save: the peers must not hang.
    out += [(mode, point, victim, "exit") for mode in ("save", "manager") for point in ("write", "gather:commit")
            for victim in (0, 1)]
    return out


@pytest.mark.parametrize(("mode", "point", "victim", "action"), _cases())
def test_fault(tmp_path, mode, point, victim, action):
    name, _, _ = point.partition(":")
    nth = GATHER_NTH[mode][point] if name == "gather" else 1
    spec = f"{name}:{nth}:{action}"
    dies = frozenset({victim}) if action == "kill" else frozenset()
    outcomes = run_ranks(2, case_worker, str(tmp_path), mode, spec, victim, timeout=90, dies=dies)
    listed = _check_storage(tmp_path, mode)
    for rank, outcome in enumerate(outcomes):
        if rank in dies:
            continue
        if name in AFTER_COMMIT:
            assert outcome == "ok", (rank, outcome)  # committed, and garbage collection is best effort
        elif rank == victim and action == "exit" and mode == "save":
            assert outcome == "SystemExit"  # on the caller's thread it goes on; on a background one it is the save's error
        else:
            assert outcome != "ok", f"rank {rank} did not raise ({outcomes})"
    if name == "dir_fsync" or name in AFTER_COMMIT:
        assert 2 in listed  # failures after the rename never take a published step away
    if action == "eio" and name == "cleanup":  # the fault fired: the stale file it was removing stayed
        assert shardckpt.verify(listed[2]).orphans
    if action == "eio" and name == "retention":  # ... and so did the step retention was removing
        assert sorted(listed) == [1, 2]


def test_matrix_names_real_points():
    # A misspelt point would arm a fault that never fires: kill cases would then fail in the
    # harness (the victim must die) and eio cases in the "did not raise" check.
    assert {p.partition(":")[0] for p in EVERY_RANK + COORDINATOR} | AFTER_COMMIT <= set(faults.POINTS)
    with pytest.raises(shardckpt.StateMismatchError, match="bad fault spec"):
        faults.parse("renmae:1:eio", "0")
