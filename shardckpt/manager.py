"""CheckpointManager: one directory per step under a root, save policies, retention, restore.

The root is a directory or a URL (``s3://bucket/run``: a step is then a key prefix); every listing
and deletion goes through its ``Storage``. A step exists only once its index is committed
(``step-00000100/index.json``). Listing and
restoring only read. Garbage (torn saves, steps retention drops) is removed by ``cleanup.collect``
on the coordinator at the start of each save and in ``close``: moments when this job has no save
in flight, while it holds the root's lock, so no other job can be saving there either.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from shardckpt import cleanup
from shardckpt.api import load, save
from shardckpt.async_save import SaveHandle, unseen_failure
from shardckpt.async_save import async_save as start_async_save
from shardckpt.catalog import committed_in as _committed
from shardckpt.catalog import committed_steps as committed_steps  # re-export (its old home)
from shardckpt.commit import read_committed_index
from shardckpt.dist import Comm
from shardckpt.errors import (
    CheckpointError,
    CheckpointIOError,
    CheckpointNotFoundError,
    CommunicationError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    RankFailedError,
    StateMismatchError,
)
from shardckpt.memtier import MemoryTier, memory_restore, memory_save
from shardckpt.options import Compression
from shardckpt.pipeline.reader import check_files
from shardckpt.saving import SaveResult
from shardckpt.storage import open_storage, parse_location
from shardckpt.storage.s3 import S3Options

log = logging.getLogger(__name__)
# A failed load of these kinds means the step's bytes are bad: restore may try an older step.
_DATA_ERRORS = (CorruptCheckpointError, IncompleteCheckpointError, CheckpointIOError)


def incomplete_reason(path: str | os.PathLike[str], s3: S3Options | None = None) -> str | None:
    """Why the checkpoint at ``path`` cannot load (index unreadable, a data file missing, of the
    wrong size or header), or None when it is complete. Reads the index and 64 bytes a file."""
    try:
        storage = open_storage(path, s3=s3)
    except CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    try:
        index = read_committed_index(storage)
        check_files(storage, index, set(range(len(index.files))), str(path))
    except CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        storage.close()
    return None


class CheckpointManager:
    """Save every ``save_interval`` steps (every call when None), keep the ``keep_last`` newest
    steps plus every step divisible by ``keep_every`` (all when both are None), restore the latest
    complete one.

    One job saves into a root at a time: the first save takes the root's lock (on the coordinator)
    and a second manager or job saving there gets ``CheckpointInUseError``. ``close()`` gives it back
    (so does leaving ``with CheckpointManager(...) as manager:``, and so does a manager dropped
    unclosed, once it is garbage collected).

    With ``memory`` (a ``MemoryTier``), every ``memory.every`` steps are also saved into host
    memory, copied to other nodes, and ``restore`` loads from there when the surviving nodes hold
    a step at least as new as the newest durable one (``last_restore`` says which tier and why).

    Example::

        manager = CheckpointManager("ckpt", keep_last=3, save_interval=100)
        start = manager.restore(state) or 0
        for step in range(start + 1, total + 1):
            train_step()
            manager.save(step, state)
        manager.close()
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        save_interval: int | None = None,
        async_save: bool = True,
        process_group: dist.ProcessGroup | None = None,
        compression: Compression = "auto",
        s3: S3Options | None = None,
        memory: MemoryTier | None = None,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every), ("save_interval", save_interval)):
            if value is not None and value < 1:
                raise StateMismatchError(f"CheckpointManager {name} must be >= 1, not {value}")
        where = parse_location(root)
        self._where = where
        # A Path for a local root (as before); the URL for an object-store root.
        self.root: Path | str = where.path if where.path is not None else where.url
        self.s3 = s3
        self._storage = open_storage(root, s3=s3)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.save_interval = save_interval
        self.async_save = async_save
        self.process_group = process_group
        self.compression = compression
        self.comm = Comm.for_group(process_group)
        self._pending: tuple[int, SaveHandle] | None = None
        # Retention's view of the root: the step this manager saves last (it applies keep_last to
        # the steps up to it), and which steps are known to load (checked once each).
        self._last_saved: int | None = None
        self._usable: dict[int, bool] = {}
        self._lock = self._storage.lock("CheckpointManager") if self.comm.is_coordinator else None
        # The memory tier in front of the root (memtier): saved every ``memory.every`` steps.
        self.memory = memory.for_root(str(where.path.absolute()) if where.path is not None else where.url) if memory else None
        self._pending_memory: tuple[int, SaveHandle] | None = None
        self.last_restore: RestoreReport | None = None  # what the last restore chose, and why

    def path_for(self, step: int) -> Path | str:
        """Where ``step`` is saved: a ``Path`` under a local root, a URL under an object-store root."""
        return self._where.join(_step_name(step))

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return _committed(self._storage)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.save_interval is None or step % self.save_interval == 0

    def save(self, step: int, state: dict[str, object], *, force: bool = False) -> SaveHandle | SaveResult | None:
        """Save ``state`` as ``step`` (collective) unless the interval policy skips it. Async by
        default: returns the handle once the snapshot is taken. A failure of the previous async
        save that nobody saw through its handle or ``wait()`` is raised here, on every rank."""
        if step < 0:
            raise StateMismatchError(f"step must be >= 0, not {step}")
        to_memory = self.memory is not None and step % self.memory.every == 0
        durable = force or self.should_save(step)
        if to_memory or (durable and self._pending_memory is not None):
            # Saves of a group never overlap; a memory save's failure is seen here, not by the next save.
            self._finish_memory_pending()
        if to_memory:
            assert self.memory is not None
            try:
                handle = memory_save(state, step, self.memory, process_group=self.process_group,
                                     metadata={"step": step})
            except CheckpointError as e:
                # Raised alike on every rank (too few nodes for the copies, after a shrink to one
                # node): the step is not in memory, the durable policy still applies.
                log.warning("the memory-tier save of step %d was refused: %s", step, e)
            else:
                self._pending_memory = (step, handle)
                if not durable:
                    return handle
                self._finish_memory_pending()  # the durable save would wait for it anyway
        if not durable:
            return None
        unseen = self._finish_pending()

        def housekeeping() -> tuple[None, object]:
            if unseen is not None:
                raise unseen
            if self._lock is not None:
                if not self._lock.held:
                    self._lock.acquire()  # creates the root if it is new
                    self._storage.fsync_parent()  # whose entry in its parent must outlive a power loss
                self._collect(step)
                self._storage.child(_step_name(step))  # refuses a local step that is a symbolic link
            return None, None

        self.comm.run(f"save of step {step} under {self.root}: housekeeping", housekeeping)
        self._last_saved = step
        self._usable.pop(step, None)  # a save again of a step replaces it
        path = self.path_for(step)
        metadata = {"step": step}
        if not self.async_save:
            self._usable[step] = False  # unless it returns: see _finish_pending
            result = save(
                state, path, process_group=self.process_group, compression=self.compression, metadata=metadata, s3=self.s3
            )
            self._usable[step] = True
            return result
        handle = start_async_save(
            state, path, process_group=self.process_group, compression=self.compression, metadata=metadata, s3=self.s3
        )
        self._pending = (step, handle)
        return handle

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight (if any); raises its failure."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending[1].wait()
        finally:
            self._usable[pending[0]] = pending[1].succeeded  # as in _finish_pending

    def restore(
        self, state: dict[str, object], step: int | None = None, *, strict: bool = True, read_once: bool = False
    ) -> int | None:
        """Load ``step``, or else the newest complete step, into ``state``; collective. Returns the
        step, or None when the root holds no checkpoint at all.

        Without ``step``, a step whose index is unreadable, whose data files are missing or the
        wrong size, or whose load finds corrupt blocks is skipped (with a warning naming it and the
        reason) for the next older one; it raises only when no step can be loaded.

        ``read_once`` is ``load``'s: each block that several ranks need is read from storage once
        and sent to the others (worth it where storage, not the network, is the limit)."""
        unseen = self._finish_pending()

        def choose() -> tuple[None, object]:
            if unseen is not None:
                raise unseen
            if not self.comm.is_coordinator:
                return None, None
            if step is not None:
                reason = incomplete_reason(self.path_for(step), self.s3) if step in self.steps() else "not committed"
                if reason is not None:
                    raise CheckpointNotFoundError(f"step {step} under {self.root} cannot be restored: {reason}")
                return None, [step]
            return None, self._complete_steps()

        self._finish_memory_pending()
        why_durable = "no memory tier"
        if self.memory is not None and step is None:
            # From memory when it holds a step at least as new as the newest committed durable one:
            # host memory on the surviving nodes instead of storage. Only the listing of the root
            # is read for that (no index, no data file), so a memory restore reads nothing durable.
            def newest() -> tuple[None, object]:
                if unseen is not None:
                    raise unseen
                return None, self.latest_step() if self.comm.is_coordinator else None

            _, listed = self.comm.run(f"restore from {self.root}: the newest durable step", newest)
            latest = listed[0]
            got = memory_restore(state, self.memory, process_group=self.process_group, strict=strict,
                                 newer_than=int(latest) - 1 if isinstance(latest, int) else None)
            if got.step is not None:
                self._report(got.step, "memory", got.reason)
                return got.step
            why_durable = f"the memory tier has no usable step at least as new as the durable one: {got.reason}"
            unseen = None  # raised above if there was one
        _, gathered = self.comm.run(f"restore from {self.root}", choose)
        candidates = [int(s) for s in gathered[0]]  # type: ignore[attr-defined]
        for i, chosen in enumerate(candidates):
            try:
                load(state, self.path_for(chosen), process_group=self.process_group, strict=strict, s3=self.s3,
                     read_once=read_once)
            except CheckpointError as e:
                if i + 1 == len(candidates) or not self._agree_to_fall_back(e):
                    raise
                self._usable[chosen] = False  # bad bytes, agreed by every rank: retention counts it out
                if self.comm.is_coordinator:
                    log.warning("restore: step %d under %s failed to load (%s); trying step %d", chosen, self.root, e,
                                candidates[i + 1])
                continue
            self._report(chosen, "durable", why_durable if step is None else f"step {step} was asked for")
            return chosen
        self._report(None, None, why_durable)
        return None

    def _report(self, step: int | None, tier: str | None, reason: str) -> None:
        self.last_restore = RestoreReport(step, tier, reason)
        if self.comm.is_coordinator:
            if step is None:
                log.info("restore: nothing to restore under %s (%s)", self.root, reason)
            else:
                log.info("restored step %d from the %s tier (%s): %s", step, tier, self.root, reason)

    def _finish_memory_pending(self) -> None:
        """Wait for the memory-tier save in flight. Its failure is logged, not raised: the step is
        then missing from the memory tier, which restore handles, and training goes on."""
        pending, self._pending_memory = self._pending_memory, None
        if pending is None:
            return
        try:
            pending[1].wait()
        except CheckpointError as e:
            log.warning("the memory-tier save of step %d failed: %s", pending[0], e)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if kind is None:
            self.close()
            return
        try:  # leaving on an exception: that exception is the one to see, not a save's failure
            self.close()
        except CheckpointError as e:
            log.warning("closing the manager of %s after %s: %s", self.root, kind.__name__, e)

    def close(self) -> None:
        """Wait for the save in flight, apply retention and give the root's lock back."""
        try:
            self._finish_memory_pending()
            self.wait()
        finally:
            if self._lock is not None and self._lock.held:
                self._collect(self._last_saved)
                self._lock.release()

    def _finish_pending(self) -> CheckpointError | None:
        """Wait for the save in flight; its failure if nobody has seen it (raised by the caller
        inside a gather, so that every rank raises together)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        failure = unseen_failure(pending[1], f"the save of step {pending[0]} under {self.root}")
        # Committed just now: retention need not read it back. A save that failed after its commit
        # point (published, but its durability unsure) is never counted as a step to keep.
        self._usable[pending[0]] = pending[1].succeeded
        return failure

    def _collect(self, upto: int | None) -> None:
        """Retention up to ``upto``, the step being saved (None: this manager saved nothing, so
        only torn steps go). ``keep_last`` counts loadable steps only: a damaged step never takes
        the place of the last step a restore can use."""
        try:
            cleanup.collect(self._storage, self.keep_last, self.keep_every, upto, self._loads)
        except (OSError, CheckpointError) as e:  # garbage collection must never fail a save
            log.warning("cleaning up %s failed: %s", self.root, e)

    def _loads(self, step: int) -> bool:
        """Whether ``step`` looks loadable (``incomplete_reason``), or failed a restore here."""
        if step not in self._usable:
            self._usable[step] = incomplete_reason(self.path_for(step), self.s3) is None
        return self._usable[step]

    def _complete_steps(self) -> list[int]:
        """Committed steps that look loadable, newest first; the others are named in a warning."""
        steps = self.steps()
        complete = []
        for s in reversed(steps):
            reason = incomplete_reason(self.path_for(s), self.s3)
            self._usable[s] = reason is None
            if reason is None:
                complete.append(s)
            else:
                log.warning("restore: skipping step %d under %s: %s", s, self.root, reason)
        if steps and not complete:
            raise IncompleteCheckpointError(
                f"{self.root}: none of the committed steps {steps} can be restored (see the warnings for each)"
            )
        return complete

    def _agree_to_fall_back(self, error: CheckpointError) -> bool:
        """Every rank says whether its load failed for bad bytes (or because another rank failed);
        the next older step is tried only if all agree, so the ranks never part ways."""
        if isinstance(error, CommunicationError):
            return False
        bad_bytes = isinstance(error, _DATA_ERRORS) or type(error) is RankFailedError
        return all(bool(v) for v in self.comm.all_gather(bad_bytes, f"restore from {self.root}: falling back"))


@dataclass(frozen=True)
class RestoreReport:
    """What ``CheckpointManager.restore`` loaded: the step (None: nothing), the tier it came from
    ("memory" or "durable") and why that one."""

    step: int | None
    tier: str | None
    reason: str


def _step_name(step: int) -> str:
    return f"step-{step:08d}"
