"""The read stage of ``load(read_once=True)``: every stored block that several ranks need is read,
verified and decoded by one of them and sent to the others over the process group.

needs (one gather) → plan (``planning/shared_reads.py``, the same on every rank) → check the data
files this rank reads → per round: read this rank's own blocks and the shared blocks it was given,
agree that no rank failed (a failure raises on every rank, typed, before anyone enters the
exchange) → one all-to-all of the decoded bytes → place the received blocks into the targets.

With N ranks holding a replicated model, storage serves each block once instead of N times; the
price is the exchange, which moves the decoded bytes between the ranks.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from shardckpt.dist import Comm
from shardckpt.errors import CheckpointError, IncompleteCheckpointError
from shardckpt.format.schema import CheckpointIndex, TensorEntry
from shardckpt.options import read_round_bytes
from shardckpt.pipeline.reader import (
    ReadRequest,
    check_files,
    place_block,
    raise_first_failure,
    read_block,
    read_into_target,
)
from shardckpt.planning.boxes import Box
from shardckpt.planning.load_plan import BlockRead
from shardckpt.planning.shared_reads import SharedReadPlan, from_runs, plan_shared_reads, to_runs
from shardckpt.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SharedReadCounts:
    """What this rank did: stored bytes it read from storage, decoded bytes it sent and received."""

    bytes_read: int
    bytes_sent: int
    bytes_received: int


def read_shared(
    storage: Storage, index: CheckpointIndex, requests: list[ReadRequest], comm: Comm, pool: ThreadPoolExecutor,
    where: str, file_readers: dict[str, frozenset[int]] | None = None,
) -> SharedReadCounts:
    """Fill every request's target, reading each block that several ranks need once in the group.
    Collective: every rank of ``comm`` calls it with its own requests (possibly none).

    ``file_readers`` (the same on every rank), when given, names the ranks whose ``storage`` holds
    each data file (the memory tier, where each rank sees only its own node's files): a block is
    read only by such a rank, and sent to the ranks that need it."""
    entries: list[tuple[TensorEntry, int]] = []  # block number -> (entry, block position in it)
    number: dict[int, int] = {}
    for entry in index.tensors:
        for i, stored_block in enumerate(entry.blocks):
            number[id(stored_block)] = len(entries)
            entries.append((entry, i))
    stored = [e.blocks[i].length for e, i in entries]
    raw = [e.blocks[i].raw_length for e, i in entries]
    uses: dict[int, list[tuple[ReadRequest, BlockRead]]] = {}
    for req in requests:
        for read in req.reads:
            uses.setdefault(number[id(read.block)], []).append((req, read))

    _, gathered = comm.run(f"load from {where}: sharing which blocks each rank needs", lambda: (None, to_runs(list(uses))))
    try:
        needs = [from_runs(runs, len(entries)) for runs in gathered]  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:  # every rank ran the same code on the same index: a bug
        raise CheckpointError(f"{where}: the ranks disagree about the index's blocks ({e})") from e
    readable = None
    if file_readers is not None:
        names = [f.name for f in index.files]
        readable = [file_readers.get(names[e.blocks[i].file], frozenset()) for e, i in entries]
    try:
        plan = plan_shared_reads(needs, stored, raw, read_round_bytes(), readable)
    except ValueError as e:  # the caller's file_readers leave a needed file unread
        raise IncompleteCheckpointError(f"{where}: {e}") from e
    me = comm.rank
    private = [b for b in sorted(uses) if b not in plan.readers]
    assigned = [b for b in sorted(plan.readers) if plan.readers[b] == me]

    def check() -> tuple[None, object]:
        check_files(storage, index, {entries[b][0].blocks[entries[b][1]].file for b in private + assigned}, where)
        return None, None

    # Every block's file is checked by the rank that reads it before any rank sizes a target from
    # the index (see ReadRequest.allocate): once this gather passes, the index's sizes are real.
    comm.run(f"load from {where}: checking data files", check, typed=True)
    for req in requests:
        if req.allocate:
            req.target.resize_(req.needed.sizes)
            req.allocate = False

    sent = received = 0
    bytes_read = sum(stored[b] for b in private + assigned)
    times = {"read": 0.0, "exchange": 0.0, "place": 0.0}
    for i, blocks in enumerate(plan.rounds or ((),)):
        t0 = time.perf_counter()
        send, send_sizes, slots = _send_layout(plan, blocks, raw, me, comm.world_size)
        futures: list[Future[None]] = [
            pool.submit(_read_and_share, storage, index, entries[b], uses.get(b, []), send, slots[b], plan, b, me, where)
            for b in blocks if plan.readers[b] == me
        ]
        if i == 0:
            futures += [pool.submit(read_into_target, storage, index, req, read, where)
                        for b in private for req, read in uses[b]]
        comm.run(f"load from {where}: reading", partial(_wait, futures, where), typed=True)
        recv_sizes = [sum(raw[b] for b in plan.sent(blocks, src, me)) for src in range(comm.world_size)]
        t1 = time.perf_counter()
        recv = comm.exchange(send, send_sizes, recv_sizes, f"load from {where}: sharing blocks")
        t2 = time.perf_counter()

        def place(blocks: tuple[int, ...] = blocks, recv: torch.Tensor = recv) -> tuple[None, object]:
            pos = 0
            for src in range(comm.world_size):
                for b in plan.sent(blocks, src, me):
                    entry = entries[b][0]
                    data = recv[pos : pos + raw[b]]
                    if pos % entry.torch_dtype.itemsize:
                        data = data.clone()  # a typed view needs an aligned start
                    block = data.view(entry.torch_dtype).reshape(entry.blocks[entries[b][1]].sizes)
                    for req, read in uses[b]:
                        place_block(req, read, block)
                    pos += raw[b]
            return None, None

        # In a gather too: a rank that failed here and left would leave its peers waiting in the
        # next round's collectives.
        comm.run(f"load from {where}: placing shared blocks", place, typed=True)
        sent += send.numel()
        received += recv.numel()
        times["read"] += t1 - t0
        times["exchange"] += t2 - t1
        times["place"] += time.perf_counter() - t2
    log.debug(
        "rank %d: read %d stored bytes, sent %d, received %d decoded bytes in %d rounds; seconds: %s",
        me, bytes_read, sent, received, len(plan.rounds), {k: round(v, 3) for k, v in times.items()},
    )
    return SharedReadCounts(bytes_read, sent, received)


def _wait(futures: list[Future[None]], where: str) -> tuple[None, object]:
    raise_first_failure(futures, where)
    return None, None


def _send_layout(
    plan: SharedReadPlan, blocks: tuple[int, ...], raw: list[int], me: int, world: int
) -> tuple[torch.Tensor, list[int], dict[int, list[int]]]:
    """This rank's send buffer for one round, the bytes it sends each rank, and where each block
    it reads goes in the buffer (one slot per rank that receives it)."""
    sizes = [0] * world
    slots: dict[int, list[int]] = {b: [] for b in blocks if plan.readers[b] == me}
    pos = 0
    for dest in range(world):
        for b in plan.sent(blocks, me, dest):
            slots[b].append(pos)
            pos += raw[b]
            sizes[dest] += raw[b]
    return torch.empty(pos, dtype=torch.uint8), sizes, slots


def _read_and_share(
    storage: Storage, index: CheckpointIndex, position: tuple[TensorEntry, int],
    uses: list[tuple[ReadRequest, BlockRead]], send: torch.Tensor, slots: list[int], plan: SharedReadPlan,
    number: int, me: int, where: str,
) -> None:
    """Read one shared block, copy it into this rank's targets (none when it reads the block for
    others only) and into each receiver's slot."""
    entry, i = position
    stored_block = entry.blocks[i]
    box = Box(stored_block.offsets, stored_block.sizes)
    read = uses[0][1] if uses else BlockRead(stored_block, box, box)
    try:
        block = read_block(storage, index, entry, read, where)
    except CheckpointError as e:
        others = [r for r in plan.needers[number] if r != me]
        raise _with_note(e, f"(rank {me} reads this block for ranks {others} too)") from e
    for req, read in uses:
        place_block(req, read, block)
    data = block.reshape(-1).view(torch.uint8)
    for pos in slots:
        send[pos : pos + data.numel()].copy_(data)


def _with_note(error: CheckpointError, note: str) -> CheckpointError:
    """The same error type with ``note`` appended, where the type is built from a message alone."""
    try:
        return type(error)(f"{error} {note}")
    except TypeError:
        return CheckpointError(f"{error} {note}")
