"""CheckpointManager: one directory per step under a root, save policies, retention, restore.

A step exists only once its index is committed (``step-00000100/index.json``). Directories of torn
saves (crash before the commit) are never listed and are removed by the coordinator when the
manager starts and after each commit. Retention removes a step by deleting its index first, so a
crash halfway through a removal leaves a torn directory, never a damaged committed one.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from pathlib import Path

import torch.distributed as dist

from shardckpt.api import load, save
from shardckpt.async_save import SaveHandle
from shardckpt.async_save import async_save as start_async_save
from shardckpt.dist import Comm
from shardckpt.errors import CheckpointError, CheckpointIOError, CheckpointNotFoundError, StateMismatchError
from shardckpt.format.schema import INDEX_NAME
from shardckpt.options import Compression
from shardckpt.saving import SaveResult

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"step-(\d{8,})")


class CheckpointManager:
    """Save every ``save_interval`` steps (every call when None), keep the ``keep_last`` newest
    steps plus every step divisible by ``keep_every`` (all when both are None), restore the latest.

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
        root: str | Path,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        save_interval: int | None = None,
        async_save: bool = True,
        process_group: dist.ProcessGroup | None = None,
        compression: Compression = "zstd",
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every), ("save_interval", save_interval)):
            if value is not None and value < 1:
                raise StateMismatchError(f"CheckpointManager {name} must be >= 1, not {value}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.save_interval = save_interval
        self.async_save = async_save
        self.process_group = process_group
        self.compression = compression
        self.comm = Comm.for_group(process_group)
        self._pending: tuple[int, SaveHandle] | None = None
        self._lock = threading.Lock()
        if self.comm.is_coordinator:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointIOError(f"cannot create checkpoint root {self.root}: {e.strerror}") from e
            self._remove_torn(keep=None)

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.fullmatch(p.name)
            if m and (p / INDEX_NAME).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.save_interval is None or step % self.save_interval == 0

    def save(self, step: int, state: dict[str, object], *, force: bool = False) -> SaveHandle | SaveResult | None:
        """Save ``state`` as ``step`` (collective) unless the interval policy skips it. Async by
        default: returns the handle once the snapshot is taken; retention runs after the commit."""
        if step < 0:
            raise StateMismatchError(f"step must be >= 0, not {step}")
        if not force and not self.should_save(step):
            return None
        self.wait()
        path = self.path_for(step)
        metadata = {"step": step}
        if not self.async_save:
            result = save(state, path, process_group=self.process_group, compression=self.compression, metadata=metadata)
            self._after_commit(step)
            return result
        handle = start_async_save(
            state, path, process_group=self.process_group, compression=self.compression, metadata=metadata
        )
        self._pending = (step, handle)
        handle.add_done_callback(lambda ok: self._after_commit(step) if ok else None)
        return handle

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight (if any); raises its failure."""
        pending, self._pending = self._pending, None
        return pending[1].wait() if pending else None

    def restore(self, state: dict[str, object], step: int | None = None, *, strict: bool = True) -> int | None:
        """Load the given step, or the latest committed one, into ``state``; returns the step, or
        None when there is no checkpoint. Every rank restores the step the coordinator chose."""
        self.wait()
        chosen = step if step is not None else self.latest_step()
        _, choices = self.comm.run(f"restore from {self.root}", lambda: (None, chosen))
        chosen = choices[0]  # type: ignore[assignment]
        if chosen is None:
            return None
        assert isinstance(chosen, int)
        if not (self.path_for(chosen) / INDEX_NAME).is_file():
            raise CheckpointNotFoundError(f"step {chosen} has no committed checkpoint under {self.root}")
        load(state, self.path_for(chosen), process_group=self.process_group, strict=strict)
        return chosen

    def close(self) -> None:
        """Wait for the save in flight and apply retention."""
        self.wait()

    def _after_commit(self, step: int) -> None:
        if not self.comm.is_coordinator:
            return
        try:
            with self._lock:
                self._retain()
                self._remove_torn(keep=self._pending[0] if self._pending else None)
        except (OSError, CheckpointError) as e:  # retention must never fail a committed save
            log.warning("retention under %s failed: %s", self.root, e)

    def _retain(self) -> None:
        steps = self.steps()
        if not steps or (self.keep_last is None and self.keep_every is None):
            return
        keep = {steps[-1]}  # the newest committed checkpoint is never deleted
        if self.keep_last is not None:
            keep.update(steps[-self.keep_last :])
        if self.keep_every is not None:
            keep.update(s for s in steps if s % self.keep_every == 0)
        for s in steps:
            if s not in keep:
                self._delete(self.path_for(s))
                log.info("retention removed step %d from %s", s, self.root)

    def _remove_torn(self, keep: int | None) -> None:
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            m = _STEP_DIR.fullmatch(p.name)
            if m and p.is_dir() and not (p / INDEX_NAME).exists() and int(m.group(1)) != keep:
                shutil.rmtree(p, ignore_errors=True)
                log.info("removed torn save %s", p)

    @staticmethod
    def _delete(path: Path) -> None:
        # Uncommit first: a crash from here on leaves a torn directory, which is never listed.
        (path / INDEX_NAME).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
