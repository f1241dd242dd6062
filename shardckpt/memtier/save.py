"""A memory-tier save: the async save's snapshot and writers, with a commit of its own.

1. Every rank writes its data file into its node's step directory (host memory).
2. Every file is copied to its partners on other nodes (replicate.py); a failure anywhere fails
   every rank before anything is published.
3. The coordinator builds and checks the index exactly as a disk save does and publishes it on its
   node; the index travels to every rank in the commit gather, and each node's lead rank publishes
   it on its node.
4. Once every node has published, each node's lead writes ``tier.json`` (the save id, the index's
   digest, where each file's copies are): the step is whole on that node from then on
   (store.py). Then it removes files of an earlier save of the same step number and the steps
   retention drops.

Restore (restore.py) uses a step only where it is whole, and only if the surviving nodes still
hold every file. Nothing here deletes a file a published index names: a failed save leaves its
files as a torn step, which a later retention pass removes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

from shardckpt.async_save import WriteAndCommit
from shardckpt.commit import RankResult, publish_index, rank_result, remove_stale_files
from shardckpt.dist import Comm
from shardckpt.errors import CheckpointError, RankFailedError
from shardckpt.format.schema import DATA_DIR, INDEX_NAME
from shardckpt.memtier.nodes import NodeMap
from shardckpt.memtier.replicate import plan_copies, replicate
from shardckpt.memtier.store import TierStore
from shardckpt.pipeline.datafile import data_file_name, encode_header
from shardckpt.pipeline.writer import StagedWrite, finish_data, write_blocks
from shardckpt.saving import Committed, PreparedSave

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierSave:
    """What the memory-tier commit needs besides the prepared save."""

    store: TierStore
    step: int
    nodes: NodeMap
    replicas: int
    keep_last: int


def tier_writer(tier: TierSave) -> WriteAndCommit:
    """The ``write`` step of ``AsyncSaver.save`` for a memory-tier save of ``tier.step``."""

    def write_and_commit(
        prep: PreparedSave, staged: Iterator[StagedWrite], hashes: dict[str, str], comm: Comm,
        pool: ThreadPoolExecutor, on_written: Callable[[StagedWrite], None],
    ) -> Committed:
        return _commit(tier, prep, staged, hashes, comm, pool, on_written)

    return write_and_commit


def _commit(
    tier: TierSave, prep: PreparedSave, staged: Iterator[StagedWrite], hashes: dict[str, str], comm: Comm,
    pool: ThreadPoolExecutor, on_written: Callable[[StagedWrite], None],
) -> Committed:
    storage = prep.storage
    what = f"memory-tier save of step {tier.step} (node {tier.store.node})"
    name = data_file_name(prep.save_id, comm.rank)

    def write() -> tuple[RankResult, object]:
        storage.ensure_dir(DATA_DIR)
        if not prep.agreed.share.writes:
            for _ in staged:
                pass
            empty = rank_result(None, 0, [], hashes, prep.agreed.own_values)
            return empty, [None, 0]
        out = storage.create(name)
        try:
            out.append(encode_header(prep.save_id, comm.rank))
            blocks = write_blocks(staged, out, prep.options, pool, on_written, prep.background)
            size = finish_data(out)
        except BaseException:
            out.abort()
            raise
        result = rank_result(name, size, blocks, hashes, prep.agreed.own_values)
        return result, [name, size]

    own, gathered = comm.run(f"{what}: writing data", write)
    listed = cast("list[list[object]]", gathered)
    files = [cast("str | None", f) for f, _ in listed]
    sizes = [int(cast(int, s)) for _, s in listed]
    copies = plan_copies(files, tier.nodes, tier.replicas)
    replicate(comm, storage, files, sizes, copies, what)
    results = comm.gather(own, f"{what}: gathering block records")

    outcome: dict[str, object] = {"committed": False, "error": None}
    error: BaseException | None = None
    placement = {
        str(files[r]): [tier.nodes.nodes[tier.nodes.node_of[t]] for t in [r, *targets]] for r, targets in copies.items()
    }
    if comm.is_coordinator:
        assert prep.agreed.plan is not None and results is not None
        outcome, error = publish_index(storage, prep.save_id, prep.agreed.plan, cast("list[RankResult]", results),
                                       prep.metadata)
        if outcome["committed"]:
            try:
                outcome["index"] = storage.read_all(INDEX_NAME, 1 << 30).decode()
            except (OSError, CheckpointError) as e:  # published here, but the other nodes cannot get it
                outcome.update(committed=False, error=f"{type(e).__name__}: {e}")
    decided = cast("dict[str, object]", comm.all_gather(outcome, f"{what}: committing the index")[0])
    if not decided["committed"]:
        if error is not None and not isinstance(error, Exception):
            raise error
        if isinstance(error, CheckpointError):
            raise error
        msg = f"{what}: the commit failed on the coordinator (rank 0): {decided['error']}; nothing was published"
        if comm.is_coordinator:
            raise CheckpointError(msg) from error
        raise RankFailedError(msg, {0: str(decided["error"])})
    index_text = str(decided["index"])
    node = tier.nodes.node_of[comm.rank]
    lead = tier.nodes.lead(node) == comm.rank

    def publish_here() -> tuple[None, object]:
        if lead and node != tier.nodes.node_of[0]:  # the coordinator's node has its index already
            storage.publish(INDEX_NAME, index_text.encode())
        return None, None

    def record_here() -> tuple[None, object]:
        # Only now that every node holds the index does the step become whole on this node.
        if lead:
            tier.store.write_record(tier.step, prep.save_id, index_text.encode(), placement)
        return None, None

    comm.run(f"{what}: publishing the index on every node", publish_here)
    comm.run(f"{what}: recording the step as whole on every node", record_here)
    if lead:
        # A save of a step number the tier held already leaves the earlier save's files behind.
        remove_stale_files(storage, {f for f in files if f is not None})
        try:
            removed = tier.store.retain(tier.keep_last, tier.step)
        except (OSError, CheckpointError) as e:  # retention must never fail a committed save
            log.warning("memory tier retention on node %s failed: %s", tier.store.node, e)
        else:
            log.info("memory tier on node %s: step %d committed; holds %.1f MB in steps %s%s", tier.store.node,
                     tier.step, tier.store.held_bytes() / 1e6, tier.store.steps(),
                     f" (dropped {removed})" if removed else "")
    mine = cast("list[list[int]]", own["blocks"])
    totals = cast("list[int] | None", decided.get("totals"))
    raw, stored = totals if totals is not None else (0, 0)
    return Committed(raw, stored, sum(b[6] for b in mine), sum(b[5] for b in mine))
