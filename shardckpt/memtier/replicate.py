"""Copy each rank's data file to its partners on other nodes over the process group (gloo), not
through a filesystem: the nodes share none.

Every rank knows every file's size (one small gather) and the partner map (nodes.py), so every
rank derives the same schedule: files go in rounds of at most ``round_bytes`` per file, one
all-to-all per round, and the receivers append what arrives to the copies in their node's step
directory. A rank whose own read or write fails keeps taking part in every round (sending the
agreed number of bytes), so no peer waits for bytes that never come, and reports its failure in
the gather after the last round: then every rank raises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from shardckpt.dist import Comm
from shardckpt.memtier.nodes import NodeMap
from shardckpt.storage import DataWriter, Storage

log = logging.getLogger(__name__)
ROUND_BYTES = 64 << 20


def plan_copies(files: Sequence[str | None], nodes: NodeMap, replicas: int) -> dict[int, list[int]]:
    """Rank -> the ranks that keep a copy of its data file (ranks without a file: none)."""
    return {r: nodes.partners(r, replicas) for r, name in enumerate(files) if name is not None}


def replicate(
    comm: Comm, storage: Storage, files: Sequence[str | None], sizes: Sequence[int], copies: dict[int, list[int]],
    what: str, round_bytes: int = ROUND_BYTES,
) -> int:
    """Send this rank's file to its partners and write the files of the ranks it is a partner of
    into ``storage``; collective over ``comm``. Returns the bytes this rank received."""
    me, world = comm.rank, comm.world_size
    sources = [s for s, targets in copies.items() if me in targets]
    rounds = max((-(-sizes[r] // round_bytes) for r in copies), default=0)
    error: BaseException | None = None
    writers: dict[int, DataWriter] = {}
    try:
        for s in sources:
            name = files[s]
            assert name is not None
            writers[s] = storage.create(name)
    except BaseException as e:  # noqa: BLE001 - reported after the rounds, which every rank must join
        error = e
    received = 0
    for i in range(rounds):
        def piece(rank: int, i: int = i) -> int:
            return max(0, min(round_bytes, sizes[rank] - i * round_bytes))

        mine = piece(me) if me in copies else 0
        data = b""
        if mine and error is None:
            try:
                name = files[me]
                assert name is not None
                data = storage.read_range(name, i * round_bytes, mine)
            except BaseException as e:  # noqa: BLE001 - see above
                error = e
        chunk = torch.zeros(mine, dtype=torch.uint8)
        if data:
            chunk.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        targets = copies.get(me, [])
        send_sizes = [mine if d in targets else 0 for d in range(world)]
        send = torch.cat([chunk] * sum(1 for d in range(world) if d in targets)) if mine and targets else chunk[:0]
        recv_sizes = [piece(s) if s in sources else 0 for s in range(world)]
        recv = comm.exchange(send, send_sizes, recv_sizes, f"{what}: copying data files to other nodes")
        received += recv.numel()
        if error is not None:
            continue
        pos = 0
        try:
            for s in range(world):
                n = recv_sizes[s]
                if n:
                    writers[s].append(recv[pos : pos + n].numpy().tobytes())
                pos += n
        except BaseException as e:  # noqa: BLE001 - see above
            error = e

    def finish() -> tuple[None, object]:
        if error is not None:
            raise error
        for w in writers.values():
            w.finish()
        return None, None

    try:
        comm.run(f"{what}: copying data files to other nodes", finish)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return received
