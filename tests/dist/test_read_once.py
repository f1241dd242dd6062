"""load(read_once=True): each stored block that several ranks need is read from storage by one
rank and sent to the others. Bit-exact with the normal load at several N -> M, storage serves each
needed block once (counted at the real storage), and a corrupt or missing file on the reading rank
makes every rank raise the typed error instead of hanging."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

import shardckpt
from shardckpt.format.schema import DATA_HEADER_BYTES
from tests.dist.harness import run_ranks
from tests.dist.states import SPECS, expected, local_expected, place, same_bits

pytestmark = pytest.mark.timeout(240)

SMALL_BLOCKS = shardckpt.CompressionOptions(block_bytes=16 << 10)


def _count_reads() -> dict[str, int]:
    """Wrap the real local storage's reads in this process: stored block bytes and header bytes."""
    from shardckpt.storage.local import LocalStorage

    counts = {"blocks": 0, "headers": 0}
    real_range, real_into = LocalStorage.read_range, LocalStorage.read_into

    def note(name: str, offset: int, n: int) -> None:
        if name.startswith("data/"):
            counts["blocks" if offset >= DATA_HEADER_BYTES else "headers"] += n

    def read_range(self, name, offset, length):  # type: ignore[no-untyped-def]
        note(name, offset, length)
        return real_range(self, name, offset, length)

    def read_into(self, name, offset, buf):  # type: ignore[no-untyped-def]
        note(name, offset, len(buf))
        return real_into(self, name, offset, buf)

    _REAL[:] = [real_range, real_into]
    LocalStorage.read_range, LocalStorage.read_into = read_range, read_into  # type: ignore[method-assign]
    return counts


_REAL: list[object] = []


def _stop_counting() -> None:
    from shardckpt.storage.local import LocalStorage

    LocalStorage.read_range, LocalStorage.read_into = _REAL  # type: ignore[method-assign]


def save_states(rank: int, world: int, path: str) -> None:
    state: dict[str, object] = {k: place(k, expected(k), world, 0) for k in SPECS}
    state["step"] = 7
    shardckpt.save(state, path, compression=SMALL_BLOCKS)


def load_states(rank: int, world: int, path: str, read_once: bool) -> list[str]:
    state: dict[str, object] = {k: place(k, torch.zeros_like(expected(k)), world, 1) for k in SPECS}
    state["plain_f32"] = torch.zeros(1000, 3).t()  # non-contiguous target
    state["step"] = 0
    shardckpt.load(state, path, read_once=read_once)
    wrong = [k for k in SPECS if not same_bits(*local_expected(k, state[k]))]  # type: ignore[arg-type]
    return wrong + ([] if state["step"] == 7 else ["step"])


@pytest.mark.parametrize(("n", "m"), [(3, 4)])
def test_read_once_is_bit_exact_n_to_m(tmp_path, n, m):
    path = str(tmp_path / "ckpt")
    run_ranks(n, save_states, path)
    # Replicated plain tensors, DTensors with Replicate, 2-D replicate x shard meshes at 4 ranks.
    assert run_ranks(m, load_states, path, True) == [[] for _ in range(m)]


def _replicated_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.LayerNorm(64))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.ones(4, 64)).sum().backward()  # the same step on every rank: a DDP-style replica
    opt.step()
    return model, opt


def replicated_round_trip(rank: int, world: int, path: str) -> list[tuple[dict[str, int], bool]]:
    """Save a replicated model at ``world`` ranks, then load it with and without read_once."""
    model, opt = _replicated_model()
    shardckpt.save({"train": shardckpt.ModelOptimizerState(model, opt)}, path, compression=SMALL_BLOCKS)
    return [_load_replicated(path, True), _load_replicated(path, False)]


def _load_replicated(path: str, read_once: bool) -> tuple[dict[str, int], bool]:
    want, want_opt = _replicated_model()
    torch.manual_seed(99)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.LayerNorm(64))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    counts = _count_reads()
    try:
        shardckpt.load({"train": shardckpt.ModelOptimizerState(model, opt)}, path, read_once=read_once)
    finally:
        _stop_counting()
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    for p, q in zip(opt.state_dict()["state"].values(), want_opt.state_dict()["state"].values()):
        same = same and all(torch.equal(p[k], q[k]) for k in q)
    return counts, same


def test_eight_ranks_read_a_replicated_model_once(tmp_path):
    path = str(tmp_path / "ckpt")
    shared, normal = zip(*run_ranks(8, replicated_round_trip, path))
    index = shardckpt.read_index(path)
    stored = sum(b.length for t in index.tensors for b in t.blocks)
    assert all(same for _, same in shared + normal)
    per_rank = [c["blocks"] for c, _ in shared]
    # Every block once in the whole group, spread over the ranks (each reads about 1/8).
    assert sum(per_rank) == stored
    biggest = max(b.length for t in index.tensors for b in t.blocks)
    assert max(per_rank) <= stored / 8 + biggest, per_rank
    assert [c["blocks"] for c, _ in normal] == [stored] * 8  # without sharing: each rank reads all



def manager_restore_counts(rank: int, world: int, root: str) -> tuple[int, bool]:
    model, opt = _replicated_model()
    manager = shardckpt.CheckpointManager(root, async_save=False, compression=SMALL_BLOCKS)
    manager.save(3, {"train": shardckpt.ModelOptimizerState(model, opt)})
    torch.manual_seed(99)
    fresh = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.LayerNorm(64))
    counts = _count_reads()
    try:
        step = manager.restore({"train": shardckpt.ModelOptimizerState(fresh, None)}, read_once=True)
    finally:
        _stop_counting()
        manager.close()
    same = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    return counts["blocks"], step == 3 and same


def test_manager_restore_passes_read_once_through(tmp_path):
    root = str(tmp_path / "root")
    results = run_ranks(2, manager_restore_counts, root)
    assert all(ok for _, ok in results)
    index = shardckpt.read_index(os.path.join(root, "step-00000003"))
    stored = sum(b.length for t in index.tensors for b in t.blocks)
    # Every block once across both ranks, not once per rank (a stateful object is handed the
    # whole subtree it saved, so the optimizer's blocks are read too).
    assert sum(n for n, _ in results) == stored


def _corrupt_first_block(path: str, key: str) -> None:
    entry = next(t for t in shardckpt.read_index(path).tensors if t.key == key)
    block = entry.blocks[0]
    name = os.path.join(path, shardckpt.read_index(path).files[block.file].name)
    with open(name, "r+b") as f:
        f.seek(block.offset + block.length // 2)
        byte = f.read(1)
        f.seek(block.offset + block.length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def load_expecting(rank: int, world: int, path: str) -> tuple[str, str]:
    state: dict[str, object] = {k: place(k, torch.zeros_like(expected(k)), world, 1) for k in SPECS}
    state["step"] = 0
    try:
        shardckpt.load(state, path, read_once=True)
    except shardckpt.CheckpointError as e:
        return type(e).__name__, str(e)
    return "none", ""


def load_plain_with_a_failing_read(rank: int, world: int, path: str) -> tuple[str, str]:
    """Only the plain (replicated) tensors, so every block is shared; rank 1's third storage read
    (after the headers of the files it checks: a block read) fails with EIO."""
    from shardckpt.storage import faults

    os.environ["RANK"] = str(rank)
    faults.configure("read:3:eio@1")
    state: dict[str, object] = {k: torch.zeros_like(expected(k)) for k in SPECS if k.startswith(("plain", "big"))}
    try:
        shardckpt.load(state, path, read_once=True)
    except shardckpt.CheckpointError as e:
        return type(e).__name__, str(e)
    finally:
        faults.configure("")
    return "none", ""


def load_all_three(rank: int, world: int, corrupt: str, missing: str, failing: str) -> list[tuple[str, str]]:
    return [load_expecting(rank, world, corrupt), load_expecting(rank, world, missing),
            load_plain_with_a_failing_read(rank, world, failing)]


def test_a_corrupt_block_or_a_storage_error_on_the_reading_rank_fails_every_rank_typed(tmp_path):
    corrupt, missing, failing = (str(tmp_path / name) for name in ("corrupt", "missing", "failing"))
    run_ranks(2, save_states, corrupt)
    shutil.copytree(corrupt, missing)
    shutil.copytree(corrupt, failing)
    _corrupt_first_block(corrupt, "plain_bf16")
    gone = shardckpt.read_index(missing).files[1].name
    os.remove(os.path.join(missing, gone))
    got = run_ranks(3, load_all_three, corrupt, missing, failing)
    assert [r[0][0] for r in got] == ["CorruptCheckpointError"] * 3, got
    for (_, msg), _, _ in got:
        assert "checksum mismatch" in msg and "'plain_bf16'" in msg and corrupt in msg
        assert "reads this block for ranks" in msg  # the reading rank is named
    kinds = {r[1][0] for r in got}
    assert len(kinds) == 1 and kinds != {"none"} and kinds != {"RankFailedError"}, got
    assert all(gone in r[1][1] for r in got)
    # EIO on rank 1 while it reads a shared block: the same typed error on every rank, naming the
    # reading rank and the ranks it read for; nobody hangs in the exchange.
    kinds = {r[2][0] for r in got}
    assert kinds == {"CheckpointIOError"}, got
    assert all("rank 1 reads this block for ranks [0, 2]" in r[2][1] and failing in r[2][1] for r in got), got


def gloo_group_exchange(rank: int, world: int) -> tuple[list[int], bool]:
    """The exchange's own gloo group (what an NCCL job's read_once runs over): created once under
    a fresh key prefix, cached, and moving uneven byte counts between the ranks."""
    import torch.distributed as dist

    from shardckpt.dist import Comm

    comm = Comm.for_group(None)
    gloo = comm._gloo_group("reads")
    send = torch.full(((rank + 1) * world,), rank, dtype=torch.uint8)
    recv = torch.empty(sum(r + 1 for r in range(world)), dtype=torch.uint8)
    gloo.alltoall_base(recv, send, [r + 1 for r in range(world)], [rank + 1] * world).wait()
    again = comm._gloo_group("reads") is gloo
    dist.barrier()
    return recv.tolist(), again


def test_the_exchange_has_its_own_gloo_group_for_nccl_jobs():
    want = [0, 1, 1, 2, 2, 2]
    assert run_ranks(3, gloo_group_exchange) == [(want, True)] * 3
