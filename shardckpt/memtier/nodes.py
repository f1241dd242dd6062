"""Which rank runs on which node, and where each rank's data file is copied: a pure function of
every rank's node id, so every rank derives the same map from one gather.

A node is named by ``SHARDCKPT_NODE_ID`` or, without it, by the host name: one torchrun agent per
host. (torchrun's node rank is no name: it is reassigned at every re-rendezvous.) Nodes are
ordered by their lowest rank, and a rank's copies go to the ranks with its local index on the
next ``replicas`` nodes, so a node's copies spread over its neighbours and every node receives as
many files as it sends.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from shardckpt.errors import StateMismatchError


def node_id() -> str:
    """This process's node name (``SHARDCKPT_NODE_ID``, else the host name)."""
    name = os.environ.get("SHARDCKPT_NODE_ID", "").strip() or socket.gethostname()
    if not name or "/" in name or name in (".", "..") or len(name) > 200:
        raise StateMismatchError(f"node id {name!r} cannot name a directory; set SHARDCKPT_NODE_ID")
    return name


@dataclass(frozen=True)
class NodeMap:
    nodes: tuple[str, ...]  # node ids, ordered by their lowest rank
    node_of: tuple[int, ...]  # rank -> index into ``nodes``

    def ranks_on(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of) if n == node]

    def lead(self, node: int) -> int:
        """The rank that writes a node's shared files (its index, its retention): its lowest."""
        return self.ranks_on(node)[0]

    def partners(self, rank: int, replicas: int) -> list[int]:
        """The ranks that keep copies of ``rank``'s data file: one on each of the next
        ``replicas`` nodes, the one with ``rank``'s local index (modulo that node's size)."""
        if replicas > len(self.nodes) - 1:
            raise StateMismatchError(
                f"{replicas} cop{'y' if replicas == 1 else 'ies'} on other nodes need at least {replicas + 1} nodes, "
                f"but the job runs on {len(self.nodes)} ({', '.join(self.nodes)})"
            )
        home = self.node_of[rank]
        local = self.ranks_on(home).index(rank)
        out = []
        for step in range(1, replicas + 1):
            ranks = self.ranks_on((home + step) % len(self.nodes))
            out.append(ranks[local % len(ranks)])
        return out


def node_map(ids: Sequence[str]) -> NodeMap:
    """``ids[r]``: rank r's node id."""
    order: dict[str, int] = {}
    for name in ids:
        order.setdefault(name, len(order))
    return NodeMap(tuple(order), tuple(order[name] for name in ids))
