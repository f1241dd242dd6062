"""Public entry points: they put the stages in order and hold no byte or slicing logic."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch.distributed as dist

from shardckpt.commit import read_committed_index
from shardckpt.dist import Comm
from shardckpt.errors import CorruptCheckpointError, MissingKeysError, StateMismatchError
from shardckpt.format.schema import DATA_DIR, CheckpointIndex, TensorEntry
from shardckpt.loading import LoadWalk
from shardckpt.options import Compression, compression_options, io_threads
from shardckpt.pipeline.reader import check_files, execute_reads, read_block, run_bounded
from shardckpt.planning.boxes import Box
from shardckpt.planning.load_plan import BlockRead, plan_reads
from shardckpt.saving import SaveResult, prepare_save, replica_hashes, result_of, stage, write_and_commit
from shardckpt.storage import Storage, open_storage

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


def save(
    state: dict[str, object],
    path: PathLike,
    *,
    process_group: dist.ProcessGroup | None = None,
    compression: Compression = "zstd",
    check_replicas: bool = True,
    metadata: Mapping[str, object] | None = None,
) -> SaveResult:
    """Save ``state`` to the directory ``path``; collective over the process group.

    Returns once the checkpoint is committed: every rank's data is fsynced and the coordinator has
    atomically published ``index.json``. A crash at any point leaves the previous checkpoint at
    ``path`` (if any) intact. Plain tensors are taken as replicated and written once in total;
    they must be equal on every rank unless wrapped in :class:`shardckpt.PerRank`.

    ``nn.Module`` and ``torch.optim.Optimizer`` objects are saved through
    ``torch.distributed.checkpoint.state_dict`` (FSDP2/TP state stays sharded, optimizer state is
    keyed by parameter name): an optimizer is paired with the module in ``state`` that owns its
    parameters, and the checkpoint is the one ``get_state_dict(model, optim)`` would give.

    Example::

        shardckpt.save({"model": model, "optim": optim, "step": step}, "ckpt/step-100")
    """
    comm = Comm.for_group(process_group)
    options = compression_options(compression)
    t0 = time.perf_counter()
    prep = prepare_save(state, path, comm, options, check_replicas, metadata)
    try:
        with ThreadPoolExecutor(io_threads(), thread_name_prefix="shardckpt-save") as pool:
            # Hashing replicas can fail too (a device error): inside the gather, like staging.
            (staged, hashes), _ = comm.run(
                f"save to {path}: staging", lambda: ((list(stage(prep)), replica_hashes(prep, pool)), None)
            )
            stall = time.perf_counter() - t0
            done = write_and_commit(prep, staged, hashes, comm, pool)
    finally:
        prep.release()
    return result_of(prep, done, stall, time.perf_counter() - t0 - stall)


def load(
    state: dict[str, object],
    path: PathLike,
    *,
    process_group: dist.ProcessGroup | None = None,
    strict: bool = True,
) -> None:
    """Fill ``state`` in place from the checkpoint at ``path``; collective.

    Tensors and DTensors receive the saved values re-sharded to their current placement and world
    size (each rank reads only the blocks overlapping its shards); ``nn.Module`` and
    ``torch.optim.Optimizer`` objects go through ``set_state_dict`` (see ``save``); other objects
    with ``state_dict`` / ``load_state_dict`` are loaded through them; other values are replaced
    in their dict or list. With ``strict`` every key of ``state`` must be in the checkpoint, also
    keys inside a value that is replaced whole (keys the checkpoint has and ``state`` lacks are
    ignored, so a subset can be loaded). On failure every rank raises and the state may be partly
    loaded.

    Example::

        shardckpt.load({"model": model, "optim": optim, "step": 0}, "ckpt/step-100")
    """
    comm = Comm.for_group(process_group)
    storage = open_storage(path)
    where = str(path)
    try:
        index, ids = comm.run(f"load from {path}: reading the index", lambda: _read_index_and_id(storage))
        if len(set(ids)) > 1:
            raise CorruptCheckpointError(
                f"{where}: ranks read different indexes ({sorted(set(map(str, ids)))}); was the checkpoint "
                "replaced during the load, or is the directory not shared?"
            )
        walk = LoadWalk(index, comm.rank, where)

        def read() -> tuple[None, object]:
            walk.fill_root(state)
            if strict and walk.missing:
                shown = ", ".join(repr(k) for k in walk.missing[:20])
                more = f" and {len(walk.missing) - 20} more" if len(walk.missing) > 20 else ""
                raise MissingKeysError(
                    f"{where}: rank {comm.rank}: keys not in the checkpoint: {shown}{more} "
                    "(pass strict=False to load the rest)"
                )
            files = {r.block.file for req in walk.requests for r in req.reads}
            check_files(storage, index, files, where)
            with ThreadPoolExecutor(io_threads(), thread_name_prefix="shardckpt-load") as pool:
                execute_reads(storage, index, walk.requests, pool, where)
            return None, None

        comm.run(f"load from {path}", read)
    finally:
        storage.close()

    def apply() -> tuple[None, object]:
        # In a gather of its own, so that one rank's failing load_state_dict makes every rank raise.
        # (A load_state_dict that runs collectives must raise on every rank alike, or its peers wait.)
        for obj, filled in walk.statefuls:
            try:
                obj.load_state_dict(filled)  # type: ignore[attr-defined]
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise StateMismatchError(
                    f"{where}: rank {comm.rank}: {type(obj).__name__}.load_state_dict rejected the saved state: "
                    f"{type(e).__name__}: {e}"
                ) from e
        return None, None

    comm.run(f"load from {path}: load_state_dict", apply)


def _read_index_and_id(storage: Storage) -> tuple[CheckpointIndex, object]:
    index = read_committed_index(storage)
    return index, index.save_id


def read_index(path: PathLike) -> CheckpointIndex:
    """The checkpoint's metadata (tensors, blocks, values, files) with no torch.distributed needed.
    Values are in their stored typed-JSON form; ``shardckpt.format.values.decode_value`` decodes them."""
    return read_committed_index(open_storage(path))


@dataclass(frozen=True)
class VerifyReport:
    path: str
    files: int
    tensors: int
    blocks: int
    bytes_raw: int
    bytes_stored: int
    # Data files the index does not name: left by an interrupted save into the same directory.
    # Not corruption (the checkpoint loads in full); the next save there removes them.
    orphans: tuple[str, ...] = ()


def verify(path: PathLike) -> VerifyReport:
    """Re-read every stored byte against its checksum and decode it; raises a CheckpointError on any
    missing, truncated, swapped or corrupt data file or block. Files the index does not name are
    reported in ``orphans``, not raised. Reads only: nothing is written or deleted."""
    storage = open_storage(path)
    where = str(path)
    try:
        index = read_committed_index(storage)
        check_files(storage, index, set(range(len(index.files))), where)
        live = {f.name for f in index.files}
        orphans = tuple(n for n in storage.list(DATA_DIR) if n not in live)
        if orphans:
            log.warning("%s: data files not named by the index (left by an interrupted save): %s", where, list(orphans))
        jobs: list[tuple[TensorEntry, BlockRead]] = []
        for entry in index.tensors:
            jobs.extend((entry, r) for r in plan_reads(entry, Box.full(entry.shape), where))
        # Streamed: each decoded block is dropped once checked, so memory holds a few blocks in
        # flight, not the checkpoint.
        threads = io_threads()
        with ThreadPoolExecutor(threads, thread_name_prefix="shardckpt-verify") as pool:
            run_bounded(pool, (partial(read_block, storage, index, entry, r, where) for entry, r in jobs), 2 * threads, where)
    finally:
        storage.close()
    return VerifyReport(
        where, len(index.files), len(index.tensors), len(jobs), index.bytes_raw(), index.bytes_stored(), orphans
    )
