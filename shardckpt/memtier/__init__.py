"""The memory tier: checkpoints in each node's host memory (``/dev/shm``), copied to other nodes, that
survive a worker restart and the loss of a node, and restore re-sharded from the survivors.

``MemoryTier`` configures it; ``memory_save`` starts an async save into it; ``memory_restore``
loads the newest step the surviving nodes hold whole. ``CheckpointManager(memory=...)`` puts it in
front of durable storage (docs/memory_tier.md).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch.distributed as dist

from shardckpt.async_save import SaveHandle, saver_for
from shardckpt.dist import Comm
from shardckpt.errors import (
    CheckpointError,
    CommunicationError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    RankFailedError,
)
from shardckpt.format.index_json import decode_index
from shardckpt.format.schema import CheckpointIndex
from shardckpt.memtier.nodes import NodeMap, node_id, node_map
from shardckpt.memtier.restore import Choice, choose_step
from shardckpt.memtier.save import TierSave, tier_writer
from shardckpt.memtier.store import DEFAULT_ROOT, StepView, TierStore, index_digest
from shardckpt.options import Compression

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryTier:
    """Where and how the memory tier keeps checkpoints.

    ``root/job/<node>/step-N`` holds a node's steps (``job`` keeps two jobs on one host apart).
    Without ``job``, a ``CheckpointManager`` names the tier after its durable root, so a run never
    meets the tier of a run saving elsewhere; ``memory_save`` and ``memory_restore`` alone use
    "default". Each rank's data file is copied to ``replicas`` other nodes; a step is kept until
    ``keep_last`` newer ones are complete. ``every``: the manager saves to memory every that many
    steps."""

    every: int = 1
    keep_last: int = 2
    replicas: int = 1
    root: str = DEFAULT_ROOT
    job: str | None = None

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1 or self.replicas < 0:
            raise CheckpointError(f"MemoryTier needs every >= 1, keep_last >= 1 and replicas >= 0, not {self}")
        if self.job is not None and (not self.job or "/" in self.job or "\0" in self.job or self.job in (".", "..")):
            raise CheckpointError(f"MemoryTier job {self.job!r} cannot name a directory")

    def store(self, node: str | None = None) -> TierStore:
        return TierStore(Path(self.root) / (self.job or "default"), node or node_id())

    def for_root(self, location: str) -> MemoryTier:
        """This tier as a manager of the durable root ``location`` uses it: without a ``job``, one
        named after the root (its last part and a digest of the whole location)."""
        if self.job is not None:
            return self
        tail = re.sub(r"[^A-Za-z0-9._-]", "_", location.rstrip("/").rsplit("/", 1)[-1])[:40].strip(".") or "root"
        return replace(self, job=f"{tail}-{hashlib.sha256(location.encode()).hexdigest()[:12]}")


@dataclass(frozen=True)
class MemoryRestore:
    """What ``memory_restore`` did: the step it loaded (None: nothing usable) and why."""

    step: int | None
    reason: str


def memory_save(
    state: dict[str, object], step: int, tier: MemoryTier, *, process_group: dist.ProcessGroup | None = None,
    compression: Compression = "none", metadata: dict[str, object] | None = None,
) -> SaveHandle:
    """Start an async save of ``state`` as ``step`` into the memory tier; collective. Returns once
    the snapshot is taken, like ``async_save``; the copies to other nodes and the commit run in
    the background, and ``handle.wait()`` raises if any failed. Stored raw by default: memory is
    fast, and the time goes into the copies."""
    comm = Comm.for_group(process_group)
    store = tier.store()

    def name_node() -> tuple[None, object]:
        store.node_storage().child(store.step_dir(step).name)  # a step directory that is a link is refused
        return None, node_id()

    _, ids = comm.run(f"memory-tier save of step {step}: naming the nodes", name_node)
    nodes = node_map([str(n) for n in ids])
    nodes.partners(comm.rank, tier.replicas)  # too few nodes: refuse on every rank, before any write
    job = TierSave(store, step, nodes, tier.replicas, tier.keep_last)
    saver = saver_for(comm)
    return saver.save(state, store.step_dir(step), compression, True, metadata, False, write=tier_writer(job))


def memory_restore(
    state: dict[str, object], tier: MemoryTier, *, process_group: dist.ProcessGroup | None = None,
    strict: bool = True, newer_than: int | None = None,
) -> MemoryRestore:
    """Load the newest step that the surviving nodes hold whole (and newer than ``newer_than``)
    into ``state``; collective. A step whose load finds a corrupt copy is skipped for the next
    older one. Returns the step and the reason for the choice; step None loads nothing."""
    from shardckpt.api import load_from

    comm = Comm.for_group(process_group)
    store = tier.store()
    # Every step a node holds whole, even older than ``newer_than``: a node holding none at all is
    # a replacement, while one that holds older steps but not a newer one says that newer one's
    # save did not finish there.
    views = [v for v in (store.view(s) for s in store.steps()) if v is not None]
    gathered = comm.all_gather([store.node, [v.payload() for v in views]], "memory-tier restore: what each node holds")
    nodes = node_map([str(cast("list[object]", g)[0]) for g in gathered])
    per_node: list[dict[int, StepView]] = [{} for _ in nodes.nodes]
    for rank, g in enumerate(gathered):
        for payload in cast("list[list[object]]", cast("list[object]", g)[1]):
            view = StepView.of(payload)
            per_node[nodes.node_of[rank]][view.step] = view
    notes: list[str] = []
    while True:
        choice = choose_step(nodes, per_node, newer_than)
        notes += choice.skipped
        if choice.step is None:
            reason = "; ".join(notes) if notes else "the memory tier holds no step on the surviving nodes"
            return MemoryRestore(None, reason)
        where = f"memory tier step {choice.step} (node {store.node})"
        try:
            index = _index_for_replacements(comm, store, nodes, per_node, choice.step, where)
            load_from(state, store.step_storage(choice.step), where, comm, strict=strict,
                      file_readers=choice.file_readers(nodes), index=index)
        except CheckpointError as e:
            # Every rank says whether its load failed for bad bytes; an older step is tried only
            # if all agree, so the ranks never part ways.
            bad = isinstance(e, CorruptCheckpointError | IncompleteCheckpointError) or type(e) is RankFailedError
            if isinstance(e, CommunicationError) or not all(
                bool(v) for v in comm.all_gather(bad, "memory-tier restore: falling back")
            ):
                raise
            notes.append(f"step {choice.step}: a copy failed its check ({e})")
            log.warning("memory tier: step %d failed to load (%s); trying an older one", choice.step, e)
            for held in per_node:
                held.pop(choice.step, None)
            continue
        nodes_held = ", ".join(nodes.nodes)
        reason = f"newest step held whole by the surviving node(s) {nodes_held}"
        if notes:
            reason += f" (skipped: {'; '.join(notes)})"
        return MemoryRestore(choice.step, reason)


def _index_for_replacements(
    comm: Comm, store: TierStore, nodes: NodeMap, per_node: list[dict[int, StepView]], step: int, where: str,
) -> CheckpointIndex | None:
    """The step's index for the ranks of nodes that hold no step (replacements), sent by the
    lowest rank of a node that holds it; None on every rank when every node holds it (each rank
    then reads its own node's copy)."""
    holders = [n for n, held in enumerate(per_node) if step in held]
    if len(holders) == len(nodes.nodes):
        return None
    source = min(r for n in holders for r in nodes.ranks_on(n))
    digest = per_node[holders[0]][step].digest

    def send() -> tuple[None, object]:
        if comm.rank != source:
            return None, None
        got = store.held(step)
        if got is None:
            raise IncompleteCheckpointError(f"{where}: rank {comm.rank}: the step is no longer whole on this node")
        return None, got[1].decode()

    _, texts = comm.run(f"{where}: sending the index to the nodes that hold no step", send)
    if nodes.node_of[comm.rank] in holders:
        return None  # reads its own node's copy, which the load checks against the others'
    data = str(texts[source]).encode()
    if index_digest(data) != digest:
        raise CorruptCheckpointError(f"{where}: rank {comm.rank}: the index received from rank {source} is not the one "
                                     "its node reported")
    return decode_index(data, f"{where} (the index from rank {source})")


def tier_bytes(tier: MemoryTier) -> int:
    """Bytes this node's memory tier holds now."""
    return tier.store().held_bytes()


__all__ = ["Choice", "MemoryRestore", "MemoryTier", "memory_restore", "memory_save", "tier_bytes"]
