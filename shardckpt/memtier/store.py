"""One node's memory tier on disk: ``<root>/<node>/step-<N>/`` in host memory (``/dev/shm``), laid
out like a manager root, so the same storage code writes it, lists it and removes old steps.

A step directory holds the data files of the node's own ranks, the copies it keeps for ranks of
other nodes, ``tier.json`` (where the coordinator placed each file's copies) and ``index.json``:
the global index, the same on every node, written last. A step is present on a node once its
``index.json`` is; files in ``/dev/shm`` outlive the training processes (a worker restart) but
not the node.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from shardckpt.catalog import committed_in
from shardckpt.cleanup import collect
from shardckpt.commit import read_committed_index
from shardckpt.errors import CheckpointError
from shardckpt.format.schema import DATA_DIR
from shardckpt.storage import Storage, open_storage

TIER_NAME = "tier.json"
DEFAULT_ROOT = "/dev/shm/shardckpt"


@dataclass(frozen=True)
class StepView:
    """What one node holds of one step: the index's save id, the files the index declares (name
    -> size) and those present on this node with their sizes."""

    step: int
    save_id: str
    declared: dict[str, int]
    present: dict[str, int]

    def payload(self) -> list[object]:
        return [self.step, self.save_id, self.declared, self.present]


class TierStore:
    def __init__(self, root: str | os.PathLike[str], node: str) -> None:
        self.root = Path(root)
        self.node = node
        self.node_dir = self.root / node

    def step_dir(self, step: int) -> Path:
        return self.node_dir / f"step-{step:08d}"

    def step_storage(self, step: int) -> Storage:
        return open_storage(self.step_dir(step))

    def node_storage(self) -> Storage:
        return open_storage(self.node_dir)

    def steps(self) -> list[int]:
        """Steps whose index this node holds, ascending."""
        if not self.node_dir.is_dir():
            return []
        return committed_in(self.node_storage())

    def view(self, step: int) -> StepView | None:
        """What this node holds of ``step``; None when its index is unreadable (a torn or damaged
        step is no candidate)."""
        storage = self.step_storage(step)
        try:
            index = read_committed_index(storage)
            present = {name: storage.size(name) for name in storage.list(DATA_DIR)}
        except (CheckpointError, OSError):
            return None
        finally:
            storage.close()
        return StepView(step, index.save_id, {f.name: f.size for f in index.files}, present)

    def write_placement(self, step: int, save_id: str, copies: dict[str, list[str]]) -> None:
        storage = self.step_storage(step)
        storage.publish(TIER_NAME, json.dumps({"step": step, "save_id": save_id, "copies": copies}).encode())

    def placement(self, step: int) -> dict[str, list[str]]:
        """``tier.json``'s record of where each file's copies were placed ({} if unreadable)."""
        try:
            data = json.loads((self.step_dir(step) / TIER_NAME).read_bytes())
            copies = data["copies"]
            return {str(k): [str(n) for n in v] for k, v in copies.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def held_bytes(self) -> int:
        """Bytes of files under this node's tier: what the tier costs the node's memory."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.node_dir):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
        return total

    def retain(self, keep_last: int) -> list[int]:
        """Remove this node's torn steps and all but its newest ``keep_last`` complete ones."""
        return collect(self.node_storage(), keep_last, None)
