"""``async_save``: the training loop stalls only for the snapshot; encoding, writing, fsync and the
commit run on background threads.

One ``AsyncSaver`` per process group owns what lives across saves: a gloo side group for the
background gathers (the job's own group must not be used from another thread), the writer pool,
the staging pool whose buffers are reused save after save, and the save in flight. Saves never
overlap: a new one first waits for the previous one (back-pressure), and a failure of the previous
save surfaces there if nobody has waited for it.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from shardckpt.dist import Comm
from shardckpt.errors import CheckpointError, StateMismatchError
from shardckpt.options import Compression, background_nice, compression_options, io_threads, staging_budget
from shardckpt.pipeline.staging import DeviceCopier, StagingPool
from shardckpt.pipeline.writer import StagedWrite
from shardckpt.saving import (
    Committed,
    PreparedSave,
    SaveResult,
    free_ring,
    prepare_save,
    result_of,
    settle_vote,
    write_and_commit,
)
from shardckpt.snapshot import SourceViews, replica_hashes, stage
from shardckpt.storage.s3 import S3Options

log = logging.getLogger(__name__)
_END = object()
# write_and_commit's signature: (prep, staged items, replica hashes, side comm, writers, on_written).
WriteAndCommit = Callable[
    [PreparedSave, Iterator[StagedWrite], dict[str, str], Comm, ThreadPoolExecutor, Callable[[StagedWrite], None]],
    Committed,
]


class _Stall:
    seconds = 0.0


class SaveHandle:
    """A save in progress. ``wait()`` returns its ``SaveResult`` or raises its error."""

    def __init__(self, path: str, future: Future[SaveResult], stall: _Stall, snapshot: threading.Event) -> None:
        self.path = path
        self._stall = stall
        self._future = future
        self._snapshot = snapshot
        self.observed = False

    @property
    def stall_seconds(self) -> float:
        """Time the caller was held: inside async_save, plus (lazy mode) optimizer steps that waited."""
        return self._stall.seconds

    def done(self) -> bool:
        return self._future.done()

    @property
    def succeeded(self) -> bool:
        """Whether the save has ended committed (False while it runs)."""
        return self._future.done() and self._future.exception() is None

    def wait_snapshot(self, timeout: float | None = None) -> None:
        """Block until the snapshot is taken: from then on the saved tensors may change in place.
        Returns at once unless the save is lazy; a lazy save's snapshot ends, copied or failed,
        before ``optimizer.step()`` may run. Call it before other in-place writes to saved
        tensors (EMA, clipping, a forward that updates BatchNorm statistics) in lazy mode."""
        if not self._snapshot.wait(timeout):
            raise CheckpointError(f"lazy snapshot for {self.path} still copying after {timeout}s")

    def add_done_callback(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn(committed)`` on the background thread once the save ends (at once if it has)."""
        self._future.add_done_callback(lambda f: fn(f.exception() is None))

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until the save is committed; re-raises any failure as a ``CheckpointError``."""
        try:
            result = self._future.result(timeout)
        except FutureTimeout:
            raise CheckpointError(f"async save to {self.path} still running after {timeout}s") from None
        except CheckpointError:
            self.observed = True
            raise
        except BaseException as e:  # noqa: BLE001 - a SystemExit on the background thread ends only the save
            self.observed = True
            raise CheckpointError(f"async save to {self.path} failed: {type(e).__name__}: {e}") from e
        self.observed = True
        return result


def unseen_failure(handle: SaveHandle, what: str) -> CheckpointError | None:
    """Wait for ``handle``; return its failure, naming ``what``, if nobody has seen it through
    ``wait()`` yet. The caller raises it inside a gather, so that every rank raises together."""
    seen = handle.observed
    try:
        handle.wait()
    except CheckpointError as e:
        if not seen:
            unseen = CheckpointError(f"{what} failed: {e}")
            unseen.__cause__ = e
            return unseen
    return None


def lower_priority(nice: int) -> None:
    """Run the calling thread at ``nice`` or lower priority (a ThreadPoolExecutor initializer).
    Linux keeps a nice value per thread, addressed by its thread id; elsewhere that id would name
    the whole process, so this does nothing there. Never raises a thread's priority."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:  # a sandbox that forbids it: the thread keeps the process's priority
        pass


class AsyncSaver:
    def __init__(self, comm: Comm, budget_bytes: int | None) -> None:
        nice = background_nice()  # first: a bad setting raises before any group is made
        self.comm = comm
        self.side = comm.side_group()
        # The encoders and writers, the bulk of a save's CPU, yield it to training (lower_priority).
        # The commit thread keeps the job's priority: its collectives and the memory tier's copies
        # to peers hold up the other ranks' commit and the next save while it waits for a core.
        # The replicas are hashed inside the stall, where the training loop waits for them.
        self.writers = ThreadPoolExecutor(io_threads(), "shardckpt-write", lower_priority, (nice,))
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-commit")
        self.hashers = ThreadPoolExecutor(io_threads(), thread_name_prefix="shardckpt-hash")
        self.staging = StagingPool(budget_bytes)
        self.copier = DeviceCopier()
        self.views = SourceViews()  # the snapshot's sources, kept across saves of one plan
        self.last: SaveHandle | None = None

    def save(
        self,
        state: dict[str, object],
        path: Path,
        compression: Compression,
        check_replicas: bool,
        metadata: Mapping[str, object] | None,
        lazy: bool,
        budget_bytes: int | None = None,
        s3: S3Options | None = None,
        write: WriteAndCommit = write_and_commit,
    ) -> SaveHandle:
        """``write`` runs on the background thread once the snapshot streams: ``write_and_commit``,
        or the memory tier's variant (memtier/save.py), which replicates before it commits."""
        t0 = time.perf_counter()
        unseen = self._wait_previous()
        self.staging.new_round()  # only now: the previous save is over, its buffers back or lost
        if budget_bytes is not None:
            self.staging.budget = budget_bytes

        def precheck() -> None:
            # Inside the first gather: when any rank has an unseen failure, every rank raises.
            if unseen is not None:
                raise unseen

        # The plan is taken ahead of its vote, which then travels while the snapshot copies:
        # not in lazy mode (the copy runs on after this returns) nor under a staging budget
        # (the writers may have to start before the snapshot ends, and must know the plan).
        prep = prepare_save(
            state, path, self.comm, compression_options(compression), check_replicas, metadata, precheck, s3=s3,
            speculate=not lazy and self.staging.budget is None,
        )
        prep.background = True
        feed: queue.Queue[object] = queue.Queue()
        hashes: dict[str, str] = {}
        future: Future[SaveResult] = Future()
        stall = _Stall()
        snapshot_done = threading.Event()
        # Encoding waits until the snapshot is taken: on a busy host, encoder threads would
        # otherwise steal CPU from the copy that the training loop is waiting for. Only when the
        # staging budget runs out must they start early, to hand buffers back.
        go = threading.Event()
        self.staging.on_block = go.set
        self.committer.submit(self._background, prep, feed, hashes, future, stall, go, write)
        self.last = SaveHandle(str(path), future, stall, snapshot_done)
        try:
            self._start_snapshot(prep, feed, hashes, stall, t0, lazy, go, snapshot_done)
        except BaseException as e:
            snapshot_done.set()
            feed.put(e)  # the background job must not wait for a snapshot that never comes
            go.set()
            # The other ranks learn of it in the background's write gather; wait for that, so no
            # later save here overlaps this one (its lock, its side-group collectives).
            self.last.observed = True
            try:
                self.last.wait()
            except CheckpointError:
                pass
            if isinstance(e, Exception) and not isinstance(e, CheckpointError):
                raise CheckpointError(f"async save to {path}: the snapshot failed on rank {self.comm.rank}: "
                                      f"{type(e).__name__}: {e}") from e
            raise
        return self.last

    def _start_snapshot(
        self,
        prep: PreparedSave,
        feed: queue.Queue[object],
        hashes: dict[str, str],
        stall: _Stall,
        t0: float,
        lazy: bool,
        go: threading.Event,
        snapshot_done: threading.Event,
    ) -> None:
        start = _stream_marker()
        if lazy:
            # Read now, on the caller's thread, before it returns and training goes on.
            versions = _write_versions(prep)

            def before_step(*_: object) -> None:
                # An optimizer step must not change what is still being copied; its wait is stall.
                if not snapshot_done.is_set():
                    t = time.perf_counter()
                    snapshot_done.wait()
                    stall.seconds += time.perf_counter() - t

            hook = register_optimizer_step_pre_hook(before_step)

            go.set()  # lazy: the copy overlaps training anyway; let writing overlap the copy

            def snapshot() -> None:
                try:
                    self._snapshot(prep, feed, hashes, start, check=lambda: _check_unwritten(prep, versions))
                except BaseException:  # noqa: BLE001 - reaches the caller through the handle
                    pass
                finally:
                    hook.remove()
                    snapshot_done.set()

            stall.seconds = time.perf_counter() - t0
            threading.Thread(target=snapshot, name="shardckpt-snapshot", daemon=True).start()
        else:
            try:
                self._snapshot(prep, feed, hashes, start, stall, t0)
            finally:
                go.set()
                snapshot_done.set()

    def _snapshot(
        self,
        prep: PreparedSave,
        feed: queue.Queue[object],
        hashes: dict[str, str],
        start: object,
        stall: _Stall | None = None,
        t0: float = 0.0,
        check: Callable[[], None] | None = None,
    ) -> None:
        try:
            t = time.perf_counter()
            self.copier.after(start)  # type: ignore[arg-type]
            try:
                self._stage(prep, feed)
            except BaseException as e:
                settle_vote(prep, e)  # a gather the vote calls for must have this rank, failed or not
                raise
            waited = time.perf_counter()
            stands = settle_vote(prep)
            waited = time.perf_counter() - waited  # the gather and plan phases, not the snapshot's
            if not stands:
                # The ranks planned anew: what was staged follows the old plan. Nothing has read
                # it yet (the writers start after the snapshot); hand it back and stage again.
                while not feed.empty():
                    sw = feed.get_nowait()
                    if isinstance(sw, StagedWrite) and sw.pooled:
                        self.staging.release(sw.data)
                self._stage(prep, feed)
            hashes.update(replica_hashes(prep, self.hashers, self.copier, self.views))
            prep.phases["snapshot"] = time.perf_counter() - t - waited
            if check is not None:
                check()  # before _END: a failed check means nothing is committed
            if stall is not None:
                stall.seconds = time.perf_counter() - t0
            feed.put(_END)
        except BaseException as e:
            feed.put(e)  # a second copy from save() is harmless: the reader stops at the first
            raise

    def _stage(self, prep: PreparedSave, feed: queue.Queue[object]) -> None:
        for sw in stage(prep, self.staging, self.copier, views=self.views):
            feed.put(sw)
        self.copier.sync()

    def _background(
        self,
        prep: PreparedSave,
        feed: queue.Queue[object],
        hashes: dict[str, str],
        future: Future[SaveResult],
        stall: _Stall,
        go: threading.Event,
        write: WriteAndCommit,
    ) -> None:
        go.wait()
        t0 = time.perf_counter()
        ended = False

        def release(sw: StagedWrite) -> None:
            if sw.pooled:
                sw.pooled = False
                self.staging.release(sw.data)

        def items() -> Iterator[StagedWrite]:
            nonlocal ended
            while not ended:
                got = feed.get()
                if got is _END:
                    ended = True
                elif isinstance(got, BaseException):
                    ended = True
                    raise CheckpointError(f"snapshot for {prep.path} failed: {got}") from got
                else:
                    assert isinstance(got, StagedWrite)
                    yield got

        try:
            if prep.abandoned is not None:
                # Every rank raised before writing: no rank comes to the write gather.
                raise CheckpointError(f"save to {prep.path} failed before writing: {prep.abandoned}") from prep.abandoned
            done = write(prep, items(), hashes, self.side, self.writers, release)
            result = result_of(prep, done, stall.seconds, time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - delivered through the handle
            # Take (and free) whatever the snapshot still hands over, so it never blocks on the budget.
            while not ended:
                got = feed.get()
                ended = got is _END or isinstance(got, BaseException)
                if isinstance(got, StagedWrite):
                    release(got)
            prep.release()
            future.set_exception(e)
        else:
            prep.release()
            future.set_result(result)

    def _wait_previous(self) -> CheckpointError | None:
        """Wait for the save in flight; return its failure if nobody has seen it yet."""
        last, self.last = self.last, None
        return unseen_failure(last, f"the previous async save to {last.path}") if last is not None else None

    def drain(self) -> None:
        """Wait for the save in flight; raise its failure if nobody has seen it yet (this rank only:
        for ``close``, which runs no collective after it)."""
        unseen = self._wait_previous()
        if unseen is not None:
            raise unseen

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.committer.shutdown(wait=True)
            self.writers.shutdown(wait=True)
            self.hashers.shutdown(wait=True)
            self.staging.close()


def _write_versions(prep: PreparedSave) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Each saved tensor's in-place write counters (autograd's version counter, which every
    in-place op and ``copy_`` bump, under ``no_grad`` too, and which views share): its local
    tensor's and, for a DTensor shard, the DTensor's own, which is the one an in-place op on
    the DTensor (an FSDP2 parameter's ``mul_``) bumps."""
    versions: dict[str, list[tuple[torch.Tensor, int]]] = {}
    for key, item in prep.items.items():
        for t in (item.local, item.source):
            if t is None:
                continue
            try:
                versions.setdefault(key, []).append((t, t._version))
            except RuntimeError:  # inference-mode tensors keep no counter
                continue
    return versions


def _check_unwritten(prep: PreparedSave, versions: dict[str, list[tuple[torch.Tensor, int]]]) -> None:
    """Lazy mode: fail the save when a saved tensor was written in place while the snapshot was
    being taken (the copies and the replica hashes are done by now). The copy may hold the value
    from before the write, after it, or a mix; committing it would be a silent wrong result."""
    written = sorted(item.split("\0")[0] for item, counters in versions.items()
                     if any(t._version != v for t, v in counters))
    if written:
        shown = ", ".join(repr(k) for k in written[:10]) + (f" and {len(written) - 10} more" if len(written) > 10 else "")
        raise StateMismatchError(
            f"lazy async save to {prep.path}: rank {prep.comm.rank}: {shown} changed in place while the snapshot was "
            "copying it, so the checkpoint could mix values from before and after the change; nothing is committed. "
            "Lazy mode makes only optimizer.step() wait for the copy: call handle.wait_snapshot() before other "
            "in-place writes to saved tensors (EMA, clipping, BatchNorm statistics in forward), or use lazy=False"
        )


def _stream_marker() -> object:
    """An event on the caller's current CUDA stream: the snapshot must see all work queued so far."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    event = torch.cuda.Event()
    event.record()
    return event


_SAVERS: dict[object, AsyncSaver] = {}
_LOCK = threading.Lock()


def async_save(
    state: dict[str, object],
    path: str | Path,
    *,
    process_group: dist.ProcessGroup | None = None,
    compression: Compression = "auto",
    check_replicas: bool = True,
    metadata: Mapping[str, object] | None = None,
    lazy: bool = False,
    staging_budget_bytes: int | None = None,
    s3: S3Options | None = None,
) -> SaveHandle:
    """Start a save and return once a consistent snapshot exists; collective.

    After it returns the caller may change every tensor in place. Encoding, writing, fsync and the
    commit run in the background; ``handle.wait()`` returns the ``SaveResult`` or raises. A call
    while an earlier save is in flight waits for that one first.

    With ``lazy=True`` it returns before the snapshot is taken: the copy runs while forward and
    backward run. What lazy mode covers, exactly:

    - ``optimizer.step()`` (any ``torch.optim.Optimizer``) blocks until the copy is complete, so
      the step's writes never reach the checkpoint.
    - Nothing else waits. Any other in-place write to a saved tensor before the snapshot is
      complete (an EMA update, gradient clipping of saved tensors, ``copy_``, a forward that
      updates BatchNorm running statistics) is detected through the tensor's version counter,
      and the save fails with a ``StateMismatchError`` naming the tensor (raised by
      ``handle.wait()``, or the next save) instead of committing values from after the call.
      Writes that bypass the version counter are neither waited for nor detected: through
      ``.data`` or NumPy views, and inside kernels that do not declare them (the batch-norm
      kernel's ``running_mean`` / ``running_var``; a training-mode BatchNorm forward is still
      caught, by its ``num_batches_tracked`` update).
    - ``handle.wait_snapshot()`` blocks until the copy is complete: call it before such writes.

    Snapshots go into host buffers that are kept and reused by later saves. ``staging_budget_bytes``
    (or ``SHARDCKPT_STAGING_BYTES``) caps them: a larger save streams through the budget, and the
    call then returns once everything beyond the budget has been written.

    Example::

        handle = shardckpt.async_save({"model": msd, "optim": osd, "step": step}, f"ckpt/{step}")
        ...  # keep training
        handle.wait()
    """
    saver = saver_for(Comm.for_group(process_group))
    return saver.save(state, Path(path), compression, check_replicas, metadata, lazy, staging_budget_bytes, s3)


def saver_for(comm: Comm) -> AsyncSaver:
    """The process group's saver (created on first use; collective then, for its side group)."""
    with _LOCK:
        saver = _SAVERS.get(_key(comm))
        if saver is not None and saver.comm.group is not comm.group:
            stale = saver  # a recreated group reusing a dead one's id: never reuse its side group
            saver = None
            _SAVERS.pop(_key(comm))
            _close_quietly(stale)
        if saver is None:
            saver = _SAVERS[_key(comm)] = AsyncSaver(comm, staging_budget())
    return saver


def _key(comm: Comm) -> object:
    return id(comm.group) if comm.group is not None else "local"


def _close_quietly(saver: AsyncSaver) -> None:
    try:
        saver.close()
    except CheckpointError as e:
        log.warning("an async save of a process group that no longer exists failed: %s", e)


def shutdown(process_group: dist.ProcessGroup | None = None) -> None:
    """Wait for in-flight async saves and free their threads and staging memory (all groups when
    ``process_group`` is None), and the blocking save's staging ring. Call before destroying the
    process group."""
    with _LOCK:
        if process_group is None:
            savers = list(_SAVERS.values())
            _SAVERS.clear()
        else:
            saver = _SAVERS.pop(_key(Comm.for_group(process_group)), None)
            savers = [saver] if saver is not None else []
    for saver in savers:
        saver.close()
    free_ring()
