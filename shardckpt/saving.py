"""The save stages, shared by the blocking ``save`` and the background ``async_save``:
prepare (flatten, gather, plan) → stage (snapshot) → write (encode, append, fsync) → commit."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from shardckpt.commit import RankResult, publish_index, rank_result, remove_stale_files
from shardckpt.dist import Comm, PendingVote
from shardckpt.errors import CheckpointError, CheckpointIOError, CommunicationError, RankFailedError
from shardckpt.flatten import TensorItem, flatten_state
from shardckpt.format.schema import DATA_DIR
from shardckpt.format.values import encode_value
from shardckpt.options import CompressionOptions, staging_budget
from shardckpt.pipeline.datafile import data_file_name, encode_header
from shardckpt.pipeline.staging import DeviceCopier, StagingPool
from shardckpt.pipeline.writer import StagedWrite, finish_data, write_blocks
from shardckpt.plan_exchange import (
    Agreed,
    agree,
    assumed,
    ballot,
    by_ballot,
    cached_token,
    metadata_rows,
    save_id_text,
)
from shardckpt.planning.save_plan import RankMeta
from shardckpt.snapshot import replica_hashes, stage
from shardckpt.storage import Storage, StorageLock, open_storage
from shardckpt.storage.faults import hit

if TYPE_CHECKING:
    from shardckpt.storage.s3 import S3Options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveResult:
    """What a committed save did. Byte counts are totals over all ranks; seconds are this rank's."""

    path: str
    save_id: str
    world_size: int
    bytes_raw: int
    bytes_stored: int
    stall_seconds: float
    background_seconds: float
    total_seconds: float
    rank_bytes_raw: int
    rank_bytes_stored: int
    # This rank's seconds per phase: flatten, gather (waiting for the first collective: with
    # async_save's plan taken ahead of its vote, only what the snapshot did not hide), plan (agreeing on the
    # plan), snapshot, write (encode, append, fsync, the write gather), commit.
    phases: dict[str, float] = field(default_factory=dict)
    plan_reused: bool = False  # every rank reused the plan of the previous save (plan_exchange)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_raw / self.bytes_stored if self.bytes_stored else 1.0

    @property
    def throughput_mb_s(self) -> float:
        """This rank's raw bytes per second of background (encode + write + commit) time."""
        return self.rank_bytes_raw / 1e6 / self.background_seconds if self.background_seconds > 0 else 0.0


@dataclass
class PreparedSave:
    path: str  # the storage's location, as messages and SaveResult show it
    storage: Storage
    comm: Comm
    options: CompressionOptions
    agreed: Agreed  # this rank's share of the plan; the whole plan on the coordinator
    items: dict[str, TensorItem]
    check_replicas: bool
    metadata: dict[str, object]  # encoded (format.values), ready for the index
    lock: StorageLock | None  # held by the coordinator from planning until the save ends
    started: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)  # seconds, as SaveResult.phases
    background: bool = False  # written beside the training loop (async_save): its CPU time is priced
    vote: OpenVote | None = None  # still in flight: ``agreed`` is the plan it is expected to confirm
    abandoned: BaseException | None = None  # failed on every rank before writing (settle_vote)

    @property
    def save_id(self) -> str:
        return self.agreed.save_id

    def release(self) -> None:
        try:
            if self.lock is not None:
                self.lock.release()
        finally:
            self.storage.close()


def prepare_save(
    state: dict[str, object],
    path: str | os.PathLike[str],
    comm: Comm,
    options: CompressionOptions,
    check_replicas: bool,
    metadata: Mapping[str, object] | None = None,
    precheck: Callable[[], None] | None = None,
    s3: S3Options | None = None,
    speculate: bool = False,
) -> PreparedSave:
    """Flatten the state on every rank, gather the metadata, and plan who writes what.

    With ``speculate``, a rank that can reuse its cached plan takes it without waiting for the
    vote's outcome: the vote travels while the caller stages, and ``settle_vote`` confirms it.

    ``path`` is a directory or a URL (``open_storage``), opened inside the gather: a scheme with
    no backend, or a client that cannot be configured, fails every rank before anything is written.

    ``precheck`` runs first on every rank inside the failure gather: if it raises anywhere (an
    earlier async save failed unseen), every rank raises. The coordinator takes the path's lock,
    so a second job saving into the same path is refused before anything is written."""
    started = time.perf_counter()
    storage: Storage | None = None
    lock: StorageLock | None = None
    encoded_metadata: dict[str, object] = {}

    def local() -> tuple[list[TensorItem], dict[str, object]]:
        nonlocal encoded_metadata, storage, lock
        clock = time.perf_counter()
        if precheck is not None:
            precheck()
        hit("flatten")
        storage = open_storage(path, s3=s3)
        # Encode now: metadata that cannot be stored must fail before any data file exists.
        encoded_metadata = cast("dict[str, object]", encode_value(dict(metadata or {}), "metadata"))
        if comm.is_coordinator:
            lock = storage.lock("save")
            lock.acquire()
        tensors, values = flatten_state(state, comm.rank)
        own_rows, fp = metadata_rows(tensors)
        rows.extend(own_rows)
        meta: dict[str, object] = {
            "fp": fp,
            "token": cached_token(comm),
            "values": [[v.key, list(v.path), v.value, v.per_rank] for v in values],
            "save_id": save_id_text(number) if comm.is_coordinator else None,
        }
        phases["flatten"] = time.perf_counter() - clock  # with opening the storage and the lock
        return tensors, meta

    rows: list[list[object]] = []
    phases: dict[str, float] = {}
    number = secrets.randbits(63) if comm.is_coordinator else 0  # the save id, if this rank coordinates
    what = f"save to {path}: collecting the state"
    try:
        tensors: list[TensorItem] = []
        meta: dict[str, object] | None = None
        error: BaseException | None = None
        try:
            tensors, meta = local()
        except BaseException as e:  # noqa: BLE001 - every rank must learn it (the vote, then the gather)
            error = e
        own_values = cast("list[list[object]]", meta["values"]) if meta is not None else []
        fp = str(meta["fp"]) if meta is not None else None
        # A repeated save of the same structure agrees in one small all-reduce; anything else
        # (a failure included) gathers, and the gather raises on every rank (plan_exchange.py).
        try:
            mine = ballot(comm, fp, own_values, options.block_bytes, number)
        except Exception as e:  # noqa: BLE001 - a rank that cannot vote still votes "cannot", or the peers hang
            error = error or e
            mine = [1, 0, 0, 0, 0, 0]
        opened = OpenVote(comm.vote_start(mine, what, error), tensors, meta, rows, what, f"save to {path}")
        vote = opened if speculate and error is None and not mine[0] else None
        # Speculating, the cached plan serves until settle_vote confirms it after the snapshot.
        agreed = assumed(comm, own_values) if vote is not None else opened.decide(error, options.block_bytes, phases)
    except BaseException:
        if lock is not None:
            lock.release()
        if storage is not None:
            storage.close()
        raise
    assert storage is not None  # local() ran to the end on this rank
    items: dict[str, TensorItem] = {}
    for t in tensors:
        name = t.key if not t.per_rank else f"{t.key}\0{comm.rank}"
        # A strided shard's second and later boxes (flatten.py): named apart, found by _item_for.
        items[name if name not in items else f"{name}\0box{len(items)}"] = t
    return PreparedSave(
        storage.location, storage, comm, options, agreed, items, check_replicas, encoded_metadata,
        lock, started, phases, vote=vote,
    )


@dataclass
class OpenVote:
    """A save's vote on its plan (plan_exchange.ballot), and what the gather needs if it fails."""

    pending: PendingVote
    tensors: list[TensorItem]
    meta: dict[str, object] | None  # this rank's first-gather payload (None: local() failed)
    rows: list[list[object]]
    what: str
    save: str  # "save to <path>", for planning's messages

    def decide(self, error: BaseException | None, block_bytes: int, phases: dict[str, float]) -> Agreed:
        """The plan: the cached one when the vote says every rank may reuse it, else gathered and
        made anew (and ``error``, this rank's own failure, raised on every rank). Collective."""
        comm, entered = self.pending.comm, time.perf_counter()
        own_values = cast("list[list[object]]", self.meta["values"]) if self.meta is not None else []
        agreed = by_ballot(comm, self.pending.result(), own_values)
        clock = time.perf_counter()
        if agreed is None:
            _, gathered = comm.settle(self.what, self.tensors, self.meta, error)
            clock = time.perf_counter()
            metas = cast("list[RankMeta]", gathered)  # every rank's ``meta`` dict from local()
            agreed = agree(comm, self.rows, metas, block_bytes, self.save)
        phases["gather"] = clock - entered
        phases["plan"] = time.perf_counter() - clock
        return agreed


def settle_vote(prep: PreparedSave, error: BaseException | None = None) -> bool:
    """Confirm the plan that a save with its vote still open (``prepare_save(speculate=True)``)
    was staged with. True when it stands; False when the ranks planned anew (stage again).

    ``error``: this rank failed while staging. When every rank could reuse the plan, that error
    goes on to the write gather as any staging failure does; otherwise the ranks gather here, and
    every rank raises. Whatever raises here raised on every rank before any wrote: the save is
    then ``abandoned``, and its background ends without a collective."""
    vote, prep.vote = prep.vote, None
    if vote is None:
        return True
    staged = prep.agreed.share
    try:
        agreed = vote.decide(error, prep.options.block_bytes, prep.phases)
    except BaseException as e:
        prep.abandoned = e
        raise
    prep.agreed = agreed
    return agreed.share is staged


# The blocking save's host ring for device tensors (pinned for CUDA), kept across saves: pinned
# memory is slow to allocate. Bounded by the staging budget, else by _RING_BYTES.
_RING = StagingPool()
_RING_LOCK = threading.Lock()  # one blocking save streams through the ring at a time
_RING_BYTES = 512 << 20


def save_streaming(prep: PreparedSave, comm: Comm, pool: ThreadPoolExecutor) -> Committed:
    """The blocking save's write: the same staged pipeline as async_save, with host tensors used
    in place and device tensors copied through the ring while earlier items are encoded and
    written (device-to-host copies overlap encoding; host memory stays within the ring). Staging
    and the replica digests run inside the write gather, so a failure there fails every rank."""
    hashes: dict[str, str] = {}
    copier = DeviceCopier()

    def items() -> Iterator[StagedWrite]:
        yield from stage(prep, _RING, copier, copy_host=False)
        copier.sync()
        hashes.update(replica_hashes(prep, pool, copier))

    def release(sw: StagedWrite) -> None:
        if sw.pooled:
            sw.pooled = False
            _RING.release(sw.data)

    with _RING_LOCK:
        _RING.budget = staging_budget() or _RING_BYTES
        try:
            return write_and_commit(prep, items(), hashes, comm, pool, on_written=release)
        finally:
            _RING.reclaim()  # the writers are done (write_blocks waits for them)


def free_ring() -> None:
    """Give the blocking save's ring back to the system (after any save streaming through it)."""
    with _RING_LOCK:
        _RING.reclaim()
        _RING.drop_free()


@dataclass(frozen=True)
class Committed:
    bytes_raw: int
    bytes_stored: int
    rank_bytes_raw: int
    rank_bytes_stored: int


def write_and_commit(
    prep: PreparedSave,
    staged: Iterable[StagedWrite],
    hashes: dict[str, str],
    comm: Comm,
    pool: ThreadPoolExecutor,
    on_written: Callable[[StagedWrite], None] | None = None,
) -> Committed:
    """Write this rank's blocks durably, then let the coordinator commit the index.

    Whether the save is committed is one fact that every rank learns from the commit gather:
    a rank deletes its data file only when it knows that no index names it (its own write
    failed, any rank's write failed, or the coordinator reports that it did not publish). When
    the collective itself breaks, the outcome is unknown and the file stays for the garbage
    collector. After a publish nothing is deleted but the files the new index does not name.

    ``staged`` may still be filling while this runs (a streaming save); ``hashes`` is read only
    after it is exhausted. ``comm`` may differ from ``prep.comm``: a side group when this runs on a
    background thread."""
    storage = prep.storage
    name = data_file_name(prep.save_id, comm.rank)

    def write() -> tuple[RankResult, object]:
        storage.ensure_dir(DATA_DIR)
        if not prep.agreed.share.writes:
            for sw in staged:  # nothing to write, but drain the stream
                pass
            empty = rank_result(None, 0, [], hashes, prep.agreed.own_values)
            return empty, empty
        out = storage.create(name)
        try:
            out.append(encode_header(prep.save_id, comm.rank))
            blocks = write_blocks(staged, out, prep.options, pool, on_written, prep.background)
            size = finish_data(out)  # timed: the adaptive codec learns the sink speed
        except BaseException:
            out.abort()
            _discard(storage, name)
            raise
        storage.fsync_dir(DATA_DIR, point="data_dir_fsync")
        result = rank_result(name, size, blocks, hashes, prep.agreed.own_values)
        return result, result

    what = f"save to {prep.path}"
    t0 = time.perf_counter()
    local: RankResult | None = None
    payload: object = None
    failed: BaseException | None = None
    try:
        local, payload = write()
    except BaseException as e:  # noqa: BLE001 - every rank learns of it in the gather below
        failed = e
    try:
        # The block records go to the coordinator only; every rank learns whether all wrote.
        own, gathered = comm.settle(f"{what}: writing data", local, payload, failed, to_coordinator=True)
        hit("written")
    except CommunicationError:
        # Only the coordinator knows for sure that it has not committed.
        if comm.is_coordinator:
            _discard(storage, name)
        raise
    except BaseException as e:
        # A write failed somewhere (this rank's, or a peer's: a CheckpointError): nobody commits.
        # An interrupt (KeyboardInterrupt, SystemExit) after this rank's write was reported is
        # another matter: the coordinator may commit an index that names the file, so it stays.
        if failed is not None or isinstance(e, CheckpointError) or comm.is_coordinator:
            _discard(storage, name)
        raise
    results = cast("list[RankResult]", gathered)  # every rank's write() payload, on the coordinator
    t1 = time.perf_counter()
    prep.phases["write"] = t1 - t0

    outcome: dict[str, object] = {}
    error: BaseException | None = None
    if comm.is_coordinator:
        assert prep.agreed.plan is not None  # the coordinator holds the whole plan
        outcome, error = publish_index(storage, prep.save_id, prep.agreed.plan, results, prep.metadata)
    try:
        decided = comm.all_gather(outcome, f"{what}: committing the index")[0]
    except CommunicationError:
        if comm.is_coordinator and not outcome["committed"]:
            _discard(storage, name)
        raise
    assert isinstance(decided, dict)
    if not decided["committed"]:
        _discard(storage, name)
        if error is not None and not isinstance(error, Exception):
            raise error  # SystemExit, KeyboardInterrupt: after the peers know
        if isinstance(error, CheckpointError):
            raise error
        msg = f"{what}: the commit failed on the coordinator (rank 0): {decided['error']}; nothing was published"
        if comm.is_coordinator:
            raise CheckpointError(msg) from error
        raise RankFailedError(msg, {0: str(decided["error"])})
    if decided["error"] is not None:
        # Published: the index names intact, fsynced data, so nothing may be deleted. Say what failed.
        if error is not None and not isinstance(error, Exception):
            raise error
        raise CheckpointIOError(
            f"{what}: the checkpoint was published (index.json is in place and its data is intact), but "
            f"making it durable failed on the coordinator: {decided['error']}; a power loss could still undo it"
        ) from error
    if comm.is_coordinator:
        remove_stale_files(storage, {str(f) for f in cast("list[str]", outcome["files"])})
    prep.phases["commit"] = time.perf_counter() - t1
    # The coordinator's [bytes_raw, bytes_stored]; this rank's block records (write_blocks), of
    # which only the int columns 5 (stored length) and 6 (raw length) are read.
    raw, stored = cast("list[int]", decided["totals"])
    mine = cast("list[list[int]]", own["blocks"])
    return Committed(raw, stored, sum(b[6] for b in mine), sum(b[5] for b in mine))


def _discard(storage: Storage, name: str) -> None:
    """Delete this rank's data file of a save that is known not to be committed. Best effort: a
    failure here must not replace the error that made the save fail."""
    try:
        storage.delete(name)
    except (OSError, CheckpointError) as e:
        log.warning("could not remove %s/%s of a failed save: %s", storage.location, name, e)


def result_of(prep: PreparedSave, done: Committed, stall: float, background: float) -> SaveResult:
    total = time.perf_counter() - prep.started
    result = SaveResult(
        path=str(prep.path),
        save_id=prep.save_id,
        world_size=prep.comm.world_size,
        bytes_raw=done.bytes_raw,
        bytes_stored=done.bytes_stored,
        stall_seconds=stall,
        background_seconds=background,
        total_seconds=total,
        rank_bytes_raw=done.rank_bytes_raw,
        rank_bytes_stored=done.rank_bytes_stored,
        phases=dict(prep.phases),
        plan_reused=not prep.agreed.planned,
    )
    if prep.comm.is_coordinator:
        log.info(
            "saved %s: %d ranks, %.1f MB raw -> %.1f MB stored (%.2fx), stall %.3fs, background %.3fs, total %.3fs",
            prep.path, result.world_size, result.bytes_raw / 1e6, result.bytes_stored / 1e6,
            result.compression_ratio, stall, background, total,
        )
    return result
