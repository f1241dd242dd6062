"""One node's memory tier on disk: ``<root>/<node>/step-<N>/`` in host memory (``/dev/shm``), laid
out like a manager root, so the same storage code writes it, lists it and removes old steps.

A step directory holds the data files of the node's own ranks, the copies it keeps for ranks of
other nodes, ``index.json`` (the global index, the same on every node) and, last, ``tier.json``:
the step's save id, the digest of its index and where the coordinator placed each file's copies.
A node's lead writes ``tier.json`` only once every node has published the index, so a step is
held by a node when its ``tier.json`` names the save and the digest of the ``index.json`` beside
it: a save that failed on any node, a step left half replaced by a later save of the same number,
or an index damaged in memory is held nowhere. Files in ``/dev/shm`` outlive the training
processes (a worker restart) but not the node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from shardckpt.cleanup import remove_step, step_dirs
from shardckpt.errors import CheckpointError
from shardckpt.format.index_json import decode_index
from shardckpt.format.schema import DATA_DIR, INDEX_NAME, CheckpointIndex
from shardckpt.storage import Storage, open_storage

log = logging.getLogger(__name__)

TIER_NAME = "tier.json"
DEFAULT_ROOT = "/dev/shm/shardckpt"


@dataclass(frozen=True)
class StepView:
    """What one node holds of one step: the index's save id and digest, the files the index
    declares (name -> size) and those present on this node with their sizes."""

    step: int
    save_id: str
    digest: str
    declared: dict[str, int]
    present: dict[str, int]

    def payload(self) -> list[object]:
        return [self.step, self.save_id, self.digest, self.declared, self.present]

    @staticmethod
    def of(payload: list[object]) -> StepView:
        step, save_id, digest, declared, present = payload
        return StepView(int(step), str(save_id), str(digest), dict(declared), dict(present))  # type: ignore[call-overload, arg-type]


def index_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        """Step directories on this node (whole or not; never a symbolic link), ascending."""
        if not self.node_dir.is_dir():
            return []
        return sorted(step_dirs(self.node_storage()))

    def held(self, step: int) -> tuple[CheckpointIndex, bytes] | None:
        """``step``'s index and its bytes if this node holds the step whole (``tier.json`` names
        the index's save and digest); None for a torn, failed, half-replaced or damaged step."""
        storage = self.step_storage(step)
        where = f"{storage.location}/{INDEX_NAME}"
        try:
            data = storage.read_all(INDEX_NAME, 1 << 30)
            record = json.loads(storage.read_all(TIER_NAME, 1 << 24))
            index = decode_index(data, where)
            if record["save_id"] != index.save_id or record["index_sha256"] != index_digest(data):
                return None
        except (CheckpointError, OSError, ValueError, KeyError, TypeError):
            return None
        finally:
            storage.close()
        return index, data

    def view(self, step: int) -> StepView | None:
        """What this node holds of ``step``; None unless it holds the step whole."""
        got = self.held(step)
        if got is None:
            return None
        index, data = got
        storage = self.step_storage(step)
        try:
            present = {name: storage.size(name) for name in storage.list(DATA_DIR)}
        except (CheckpointError, OSError):
            return None
        finally:
            storage.close()
        return StepView(step, index.save_id, index_digest(data), {f.name: f.size for f in index.files}, present)

    def write_record(self, step: int, save_id: str, index: bytes, copies: dict[str, list[str]]) -> None:
        """Publish ``tier.json``, which makes the step whole on this node: call it only once every
        node has published the index."""
        record = {"step": step, "save_id": save_id, "index_sha256": index_digest(index), "copies": copies}
        self.step_storage(step).publish(TIER_NAME, json.dumps(record).encode())

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

    def retain(self, keep_last: int, current: int) -> list[int]:
        """After ``current`` became whole on every node: keep the newest ``keep_last`` whole steps
        up to ``current`` and what lies between them; remove older steps, and steps numbered after
        ``current``, which a job whose steps rise cannot have written (a previous run under the
        same job name, or steps past a point the job went back to) and must never restore.
        Returns the steps removed. A step whose own lock a save holds is never removed."""
        root = self.node_storage()
        dirs = step_dirs(root)
        keep_from, found = current, 0
        for s in sorted((s for s in dirs if s <= current), reverse=True):  # newest first: read no more than needed
            if found == keep_last:
                break
            if self.held(s) is not None:
                keep_from, found = s, found + 1
        removed = []
        for step, name in sorted(dirs.items()):
            if keep_from <= step <= current:
                continue
            why = "retention" if step < keep_from else f"stale (numbered after the step just saved, {current})"
            if remove_step(root, name, "retention"):
                removed.append(step)
                log.info("memory tier on node %s: removed step %d: %s", self.node, step, why)
        return removed
