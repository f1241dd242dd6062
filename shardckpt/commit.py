"""The coordinator's commit: assemble the global index from every rank's write results, check
replicas, and publish it atomically. Nothing here runs before every rank's data is durable.

The publish is the commit point: the rename of ``index.json`` (local), its single PUT (object
store). Whatever fails before it leaves nothing published; whatever fails after it must not delete
data, since the index names it."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from shardckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, ReplicaMismatchError
from shardckpt.format.index_json import decode_index, encode_index
from shardckpt.format.schema import (
    DATA_DIR,
    INDEX_NAME,
    BlockEntry,
    CheckpointIndex,
    FileEntry,
    TensorEntry,
    ValueEntry,
)
from shardckpt.planning.boxes import Box
from shardckpt.planning.load_plan import plan_reads
from shardckpt.planning.save_plan import SavePlan, plan_values
from shardckpt.storage import Storage
from shardckpt.storage.faults import hit

log = logging.getLogger(__name__)

RankResult = dict[str, object]  # {"file": name, "size": int, "blocks": [...], "hashes": {key: hex}, "values": [...]}


def rank_result(
    file: str | None, size: int, blocks: list[list[object]], hashes: dict[str, str], values: list[list[object]]
) -> RankResult:
    """What a rank sends the coordinator after writing: its data file, block records, replica
    digests and value rows (the index's values come from these: a save that reuses its plan
    gathers nothing before it writes)."""
    return {"file": file, "size": size, "blocks": blocks, "hashes": hashes, "values": values}


def check_replicas(results: list[RankResult]) -> None:
    """Plain tensors are saved once; make sure every rank held the same bytes."""
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for rank, res in enumerate(results):
        hashes = res["hashes"]
        assert isinstance(hashes, dict)
        for key, digest in sorted(hashes.items()):
            # Digests are compared within a kind (replica_digest.py: host xxh3 or device sums):
            # a replica held on the host by one rank and on a device by another has two kinds.
            first = seen.setdefault((key, digest.split(":", 1)[0]), (rank, digest))
            if first[1] != digest:
                raise ReplicaMismatchError(
                    f"plain tensor {key!r} holds different values on rank {first[0]} and rank {rank}; a plain "
                    "tensor is saved once as a replica. Make it equal on every rank, shard it as a DTensor, "
                    "or wrap it in shardckpt.PerRank to keep each rank's copy"
                )


def build_index(
    save_id: str, plan: SavePlan, results: list[RankResult], metadata: Mapping[str, object]
) -> CheckpointIndex:
    files = tuple(
        FileEntry(str(res["file"]), rank, int(res["size"]))  # type: ignore[call-overload]
        for rank, res in enumerate(results)
        if res["file"] is not None
    )
    file_of_rank = {f.rank: i for i, f in enumerate(files)}
    blocks: dict[tuple[str, int | None], list[BlockEntry]] = {}
    for rank, res in enumerate(results):
        for key, entry_rank, offsets, sizes, offset, length, raw, codec, digest, chunks in res["blocks"]:  # type: ignore[attr-defined]
            blocks.setdefault((key, entry_rank), []).append(
                BlockEntry(tuple(offsets), tuple(sizes), file_of_rank[rank], offset, length, raw, codec, digest, chunks)
            )
    tensors = []
    for spec in plan.tensors:
        found = sorted(blocks.get((spec.key, spec.entry_rank), []), key=lambda b: (b.offsets, b.file, b.offset))
        entry = TensorEntry(spec.key, spec.path, spec.dtype, spec.shape, spec.entry_rank, tuple(found))
        # A save must never commit a tensor with holes: the same check load applies.
        plan_reads(entry, Box.full(spec.shape), "save")
        tensors.append(entry)
    # Checked between ranks before anything was written (plan_exchange.py); raises if not.
    values = tuple(ValueEntry(v.key, v.path, v.value, v.entry_rank) for v in plan_values(results))
    return CheckpointIndex(save_id, len(results), files, tuple(tensors), values, metadata=dict(metadata))


def publish_index(
    storage: Storage, save_id: str, plan: SavePlan, results: list[RankResult], metadata: dict[str, object]
) -> tuple[dict[str, object], BaseException | None]:
    """On the coordinator: build, check and publish the index. Never raises: returns the outcome
    every rank must learn (``committed``: whether index.json was published; ``error``: what
    failed, before or after that point) and the exception itself, for the coordinator to raise."""
    outcome: dict[str, object] = {"committed": False, "error": None, "totals": None, "files": []}
    try:
        check_replicas(results)
        index = build_index(save_id, plan, results, metadata)
        data = encode_index(index)
        # Decode what we are about to publish: a writer bug must fail the save, not a later load.
        decode_index(data, f"{storage.location}/{INDEX_NAME}")
        # The entries that lead to the data must be durable before the index that names it.
        storage.fsync_dir("", point="data_dir_fsync")
        storage.fsync_parent()
        storage.publish(INDEX_NAME, data)
        outcome.update(committed=True, totals=[index.bytes_raw(), index.bytes_stored()], files=[f.name for f in index.files])
        storage.fsync_dir("")
    except BaseException as e:  # noqa: BLE001 - the peers must learn the outcome before anyone raises
        outcome["error"] = f"{type(e).__name__}: {e}"
        return outcome, e
    return outcome, None


def remove_stale_files(storage: Storage, live: set[str]) -> list[str]:
    """After a commit, data files of earlier or torn saves into the same directory are garbage.
    Best effort and never raising: the save is already committed, and a failure here only leaves
    files that the next save or ``verify`` reports. Only regular files under a real ``data/`` go
    (a local ``data/`` that is a symbolic link is refused by the listing: nothing outside is deleted)."""
    removed: list[str] = []
    try:
        for name in storage.list(DATA_DIR):
            if name not in live:
                hit("cleanup")
                storage.delete(name)
                removed.append(name)
    except (OSError, CheckpointError) as e:
        log.warning("cleaning stale data files in %s stopped: %s", storage.location, e)
    if removed:
        log.info("removed %d stale data file(s) from %s", len(removed), storage.location)
    return removed


def read_committed_index(storage: Storage) -> CheckpointIndex:
    where = f"{storage.location}/{INDEX_NAME}"
    if not storage.exists(""):
        raise CheckpointNotFoundError(f"no checkpoint at {storage.location}: the directory does not exist")
    try:
        data = storage.read_all(INDEX_NAME, 1 << 30)
    except CheckpointNotFoundError:
        if storage.exists(".metadata"):
            # torch.distributed.checkpoint's directory: .metadata, no index.json. Say what to run.
            raise CheckpointNotFoundError(
                f"{storage.location} is a torch.distributed.checkpoint (DCP) checkpoint (it has .metadata and no "
                f"{INDEX_NAME}), not a shardckpt one: convert it once with "
                f"`shardckpt convert --from dcp {storage.location} DST` and load DST"
            ) from None
        raise CheckpointNotFoundError(
            f"no checkpoint at {storage.location}: {INDEX_NAME} is missing (empty directory, or a save that never "
            "committed)"
        ) from None
    if not data:
        raise CorruptCheckpointError(f"{where} is empty")
    return decode_index(data, where)
