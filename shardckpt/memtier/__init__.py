"""The memory tier: checkpoints in each node's host memory (``/dev/shm``), copied to other nodes, that
survive a worker restart and the loss of a node, and restore re-sharded from the survivors.

``MemoryTier`` configures it; ``memory_save`` starts an async save into it; ``memory_restore``
loads the newest step the surviving nodes hold whole. ``CheckpointManager(memory=...)`` puts it in
front of durable storage (docs/memory_tier.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
from shardckpt.memtier.nodes import NodeMap, node_id, node_map
from shardckpt.memtier.restore import Choice, choose_step
from shardckpt.memtier.save import TierSave, tier_writer
from shardckpt.memtier.store import DEFAULT_ROOT, StepView, TierStore
from shardckpt.options import Compression

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryTier:
    """Where and how the memory tier keeps checkpoints.

    ``root/job/<node>/step-N`` holds a node's steps (``job`` keeps two jobs on one host apart).
    Each rank's data file is copied to ``replicas`` other nodes; a step is kept until ``keep_last``
    newer ones are complete. ``every``: the manager saves to memory every that many steps."""

    every: int = 1
    keep_last: int = 2
    replicas: int = 1
    root: str = DEFAULT_ROOT
    job: str = "default"

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1 or self.replicas < 0:
            raise CheckpointError(f"MemoryTier needs every >= 1, keep_last >= 1 and replicas >= 0, not {self}")
        if not self.job or "/" in self.job or self.job in (".", ".."):
            raise CheckpointError(f"MemoryTier job {self.job!r} cannot name a directory")

    def store(self, node: str | None = None) -> TierStore:
        return TierStore(Path(self.root) / self.job, node or node_id())


@dataclass(frozen=True)
class MemoryRestore:
    """What ``memory_restore`` did: the step it loaded (None: nothing usable) and why."""

    step: int | None
    reason: str


def _nodes(comm: Comm, what: str) -> NodeMap:
    return node_map([str(n) for n in comm.all_gather(node_id(), what)])


def memory_save(
    state: dict[str, object], step: int, tier: MemoryTier, *, process_group: dist.ProcessGroup | None = None,
    compression: Compression = "none", metadata: dict[str, object] | None = None,
) -> SaveHandle:
    """Start an async save of ``state`` as ``step`` into the memory tier; collective. Returns once
    the snapshot is taken, like ``async_save``; the copies to other nodes and the commit run in
    the background, and ``handle.wait()`` raises if any failed. Stored raw by default: memory is
    fast, and the time goes into the copies."""
    comm = Comm.for_group(process_group)
    nodes = _nodes(comm, f"memory-tier save of step {step}: naming the nodes")
    store = tier.store()
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
    views = [v for v in (store.view(s) for s in store.steps()) if v is not None]
    if newer_than is not None:
        views = [v for v in views if v.step > newer_than]
    gathered = comm.all_gather([store.node, [v.payload() for v in views]], "memory-tier restore: what each node holds")
    nodes = node_map([str(cast("list[object]", g)[0]) for g in gathered])
    per_node: list[dict[int, StepView]] = [{} for _ in nodes.nodes]
    for rank, g in enumerate(gathered):
        held = per_node[nodes.node_of[rank]]
        for step, save_id, declared, present in cast("list[list[object]]", cast("list[object]", g)[1]):
            held[int(cast(int, step))] = StepView(int(cast(int, step)), str(save_id), dict(cast(dict, declared)),
                                                  dict(cast(dict, present)))
    notes: list[str] = []
    while True:
        choice = choose_step(nodes, per_node)
        notes += choice.skipped
        if choice.step is None:
            reason = "; ".join(notes) if notes else "the memory tier holds no step on the surviving nodes"
            return MemoryRestore(None, reason)
        where = f"memory tier step {choice.step} (node {store.node})"
        try:
            load_from(state, store.step_storage(choice.step), where, comm, strict=strict,
                      file_readers=choice.file_readers(nodes))
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


def tier_bytes(tier: MemoryTier) -> int:
    """Bytes this node's memory tier holds now."""
    return tier.store().held_bytes()


__all__ = ["Choice", "MemoryRestore", "MemoryTier", "memory_restore", "memory_save", "tier_bytes"]
