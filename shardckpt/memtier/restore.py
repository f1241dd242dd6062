"""Restore from the memory tier: the surviving nodes agree on the newest step they hold whole, then
every rank loads it re-sharded as from disk, reading the blocks of files on its own node and
receiving the others from a rank on a node that holds them (``read_shared``), every block checked
against the index's checksum.

The choice is a pure function of what each surviving node reports (one gather), so every rank
makes the same one. A step is skipped, with the reason, when a surviving node does not hold it
whole (store.py), when the nodes' indexes differ (a stale tier from another save, or a damaged
one), or when some file has no intact copy (right size) on any surviving node. A node whose tier
holds no step at all (a replacement that just joined) holds nothing to disagree with: it takes
part in the load, receives the index from a node that holds the step and reads nothing itself. A
rank never opens a file outside its own node's tier.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardckpt.memtier.nodes import NodeMap
from shardckpt.memtier.store import StepView


@dataclass(frozen=True)
class Choice:
    step: int | None
    holders: dict[str, list[int]]  # file -> indexes (into NodeMap.nodes) of the nodes that hold it
    skipped: list[str]  # why each newer step was passed over

    def file_readers(self, nodes: NodeMap) -> dict[str, frozenset[int]]:
        """File -> the ranks that can read it (those on its holder nodes)."""
        return {f: frozenset(r for n in held for r in nodes.ranks_on(n)) for f, held in self.holders.items()}


def choose_step(nodes: NodeMap, views: list[dict[int, StepView]], newer_than: int | None = None) -> Choice:
    """``views[n]``: the steps node n (of ``nodes.nodes``) holds whole. The newest step (after
    ``newer_than``) that every node holding any step holds with the same index, and whose every
    file has an intact copy somewhere."""
    skipped: list[str] = []
    for step in sorted({s for held in views for s in held if newer_than is None or s > newer_than}, reverse=True):
        missing = [nodes.nodes[n] for n, held in enumerate(views) if held and step not in held]
        if missing:
            skipped.append(f"step {step}: not whole on node(s) {', '.join(missing)} (its save did not finish there)")
            continue
        have = {n: held[step] for n, held in enumerate(views) if held}
        ids = sorted({v.save_id for v in have.values()})
        if len(ids) > 1:
            skipped.append(f"step {step}: the nodes hold different saves of it ({', '.join(ids)}); a stale tier")
            continue
        if len({v.digest for v in have.values()}) > 1:
            differ = ", ".join(f"{nodes.nodes[n]}: {v.digest[:12]}" for n, v in have.items())
            skipped.append(f"step {step}: the nodes' indexes of it differ ({differ}); a damaged or mixed tier")
            continue
        declared = next(iter(have.values())).declared
        holders = {f: [n for n, v in have.items() if v.present.get(f) == size] for f, size in declared.items()}
        lost = sorted(f for f, held in holders.items() if not held)
        if lost:
            skipped.append(
                f"step {step}: no surviving node holds an intact copy of {', '.join(lost[:3])}"
                f"{f' and {len(lost) - 3} more' if len(lost) > 3 else ''}"
            )
            continue
        return Choice(step, holders, skipped)
    return Choice(None, {}, skipped)
