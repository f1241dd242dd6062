"""Which rank reads each stored block when the ranks share their reads (``load(read_once=True)``).

A pure function of what every rank needs, so every rank computes the same plan from one gather.
Blocks are named by their position in the index (tensors in index order, blocks in entry order).
A block that one rank needs is read by that rank, as in a normal load. A block that several ranks
need (a replicated tensor, a box that overlaps several ranks' shards) is read, verified and decoded
by exactly one of them and sent to the others. Readers are chosen largest block first onto the
least-loaded rank among those that need the block, counting the blocks each rank must read anyway,
so the stored bytes each rank reads stay within one block of each other where the needs allow.
Shared blocks are exchanged in rounds of bounded size, so the send and receive buffers of one
exchange stay small next to the state being loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Runs = list[list[int]]  # [[start, stop), ...] of block numbers, ascending and disjoint


@dataclass(frozen=True)
class SharedReadPlan:
    """``readers[b]``: the rank that reads shared block ``b``; ``needers[b]``: every rank that needs
    it (ascending; the reader is among them unless no needer can read the block); ``rounds``: the
    shared blocks of each exchange, ascending. Blocks that only one rank needs, and that rank can
    read, are in none of these: that rank reads them itself."""

    readers: dict[int, int]
    needers: dict[int, tuple[int, ...]]
    rounds: tuple[tuple[int, ...], ...]

    def sent(self, block_round: Sequence[int], source: int, dest: int) -> list[int]:
        """The blocks of a round that ``source`` reads and sends to ``dest``, in the order they
        travel (ascending): both ends derive the layout of the exchange from this alone."""
        return [b for b in block_round if self.readers[b] == source and source != dest and dest in self.needers[b]]


def to_runs(blocks: Sequence[int]) -> Runs:
    """Ascending block numbers as ``[start, stop)`` runs: a replicated model's needs are one run."""
    runs: Runs = []
    for b in sorted(set(blocks)):
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return runs


def from_runs(runs: Sequence[Sequence[int]], count: int) -> list[int]:
    """The block numbers of ``runs``; raises ValueError on runs outside ``[0, count)``."""
    out: list[int] = []
    for run in runs:
        start, stop = int(run[0]), int(run[1])
        if not 0 <= start < stop <= count:
            raise ValueError(f"block run [{start}, {stop}) is outside the index's {count} blocks")
        out.extend(range(start, stop))
    return out


def plan_shared_reads(
    needs: Sequence[Sequence[int]], stored: Sequence[int], raw: Sequence[int], round_bytes: int,
    readable: Sequence[frozenset[int]] | None = None,
) -> SharedReadPlan:
    """``needs[r]``: the blocks rank r needs; ``stored[b]`` / ``raw[b]``: block b's stored and
    decoded sizes; ``round_bytes``: the decoded bytes of shared blocks per exchange round (a
    larger block gets a round of its own).

    ``readable[b]``, when given, is the set of ranks that can read block b at all (the memory
    tier: the ranks on a node that holds its file). A block its only needer cannot read becomes
    shared, and a shared block is read by a needer that can read it, else by any rank that can.
    Raises ValueError for a needed block that no rank can read."""
    holders: dict[int, list[int]] = {}
    for rank, blocks in enumerate(needs):
        for b in sorted(set(blocks)):
            holders.setdefault(b, []).append(rank)

    def can_read(rank: int, b: int) -> bool:
        return readable is None or rank in readable[b]

    load = [0] * len(needs)
    shared = []
    for b, ranks in holders.items():
        if len(ranks) == 1 and can_read(ranks[0], b):
            load[ranks[0]] += stored[b]
        else:
            shared.append(b)
    readers: dict[int, int] = {}
    for b in sorted(shared, key=lambda b: (-stored[b], b)):
        candidates = [r for r in holders[b] if can_read(r, b)]
        if not candidates and readable is not None:
            candidates = sorted(r for r in readable[b] if 0 <= r < len(needs))
        if not candidates:
            raise ValueError(f"block {b} is needed by ranks {holders[b]} but no rank can read it")
        reader = min(candidates, key=lambda r: (load[r], r))
        load[reader] += stored[b]
        readers[b] = reader
    rounds: list[tuple[int, ...]] = []
    current: list[int] = []
    size = 0
    for b in sorted(shared):
        if current and size + raw[b] > round_bytes:
            rounds.append(tuple(current))
            current, size = [], 0
        current.append(b)
        size += raw[b]
    if current:
        rounds.append(tuple(current))
    return SharedReadPlan(readers, {b: tuple(holders[b]) for b in shared}, tuple(rounds))
