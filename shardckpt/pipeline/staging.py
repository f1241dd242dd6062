"""Staging buffers for snapshots: allocated once, reused by later saves, bounded by a budget.

A save's stall is the copy of its tensors into these buffers. Reuse matters twice: allocating and
first-touching fresh host memory costs as much as the copy itself, and a training job that saves
every N steps would otherwise grow its RSS with every save. When a save is larger than the budget,
``acquire`` blocks until the writer threads release buffers, so the save streams through the
budget instead of failing or doubling host memory.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

import torch

from shardckpt.errors import CheckpointError

Shape = tuple[int, ...]


class StagingPool:
    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget = budget_bytes
        # Called (with the lock held) when acquire is about to wait for buffers to come back.
        self.on_block: Callable[[], None] | None = None
        self._free: dict[tuple[torch.dtype, Shape, bool], list[torch.Tensor]] = defaultdict(list)
        self._free_bytes = 0
        self._used_bytes = 0
        self._taken: dict[tuple[torch.dtype, Shape, bool], int] = defaultdict(int)  # this round's acquires
        self.peak_bytes = 0  # the most bytes the pool has held at once (in use or free)
        self._cond = threading.Condition()
        self._closed = False

    @property
    def held_bytes(self) -> int:
        """Bytes allocated by the pool, in use or free."""
        return self._free_bytes + self._used_bytes

    def acquire(self, dtype: torch.dtype, shape: Shape, pin: bool) -> torch.Tensor:
        nbytes = _nbytes(dtype, shape)
        key = (dtype, tuple(shape), pin)
        with self._cond:
            self._taken[key] += 1
            while True:
                if self._closed:
                    raise CheckpointError("staging pool closed while a save was staging")
                if self._free[key]:
                    buf = self._free[key].pop()
                    self._free_bytes -= nbytes
                    self._used_bytes += nbytes
                    return buf
                # A buffer larger than the whole budget is allowed when nothing else is in use,
                # otherwise one huge tensor could never be saved.
                if self.budget is None or self._used_bytes == 0 or self._used_bytes + nbytes <= self.budget:
                    self._evict(max(0, self.held_bytes + nbytes - (self.budget or self.held_bytes + nbytes)))
                    self._used_bytes += nbytes
                    self.peak_bytes = max(self.peak_bytes, self.held_bytes)
                    break
                if self.on_block is not None:
                    self.on_block()
                self._cond.wait()
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    def release(self, buf: torch.Tensor) -> None:
        nbytes = buf.numel() * buf.element_size()
        with self._cond:
            self._used_bytes = max(0, self._used_bytes - nbytes)
            self._free[(buf.dtype, tuple(buf.shape), buf.is_pinned())].append(buf)
            self._free_bytes += nbytes
            self._cond.notify_all()

    def reclaim(self) -> None:
        """Forget the buffers still counted as in use once a save is over: a failed save may drop
        buffers it took without handing them back, and they must not hold the budget forever."""
        with self._cond:
            self._used_bytes = 0
            self._cond.notify_all()

    def new_round(self) -> None:
        """Start the next save, once the last one is over. Buffers it still counts as in use (a
        failed snapshot drops those it took) stop holding the budget, or every later save under
        it would wait forever; and free buffers beyond what the last save took of each shape go
        back to the system, or a job whose tensors change shape between saves would keep every
        old shape's buffers (with no budget nothing else evicts them)."""
        self.reclaim()
        with self._cond:
            for key in list(self._free):
                keep = self._taken.get(key, 0)
                self._free_bytes -= sum(b.numel() * b.element_size() for b in self._free[key][keep:])
                del self._free[key][keep:]
                if not self._free[key]:
                    del self._free[key]
            self._taken.clear()

    def _evict(self, need: int) -> None:
        """Drop free buffers (of other shapes) until ``need`` bytes are returned to the system."""
        for key in list(self._free):
            while need > 0 and self._free[key]:
                buf = self._free[key].pop()
                n = buf.numel() * buf.element_size()
                self._free_bytes -= n
                need -= n

    def drop_free(self) -> None:
        """Return every free buffer to the system; the pool stays usable and allocates anew."""
        with self._cond:
            self._free.clear()
            self._free_bytes = 0

    def close(self) -> None:
        self.drop_free()
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _nbytes(dtype: torch.dtype, shape: Shape) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


class DeviceCopier:
    """Copies device tensors to host buffers on a side CUDA stream, so the device-to-host copies
    overlap each other and the training stream's queued work; ``sync`` waits for them all."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None
        self._pending = False
        self._start: torch.cuda.Event | None = None

    def after(self, event: torch.cuda.Event | None) -> None:
        """Order the next copies after ``event`` (recorded on the training thread's stream),
        instead of after this thread's current stream."""
        self._start = event

    def copy_host(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        """Copy host tensors into host buffers, in one ``torch._foreach_copy_``: a Python ``copy_``
        per tensor costs tens of microseconds, which for a state of many small tensors (norms,
        biases and their Adam moments) was most of the stall."""
        with torch.no_grad():  # sources may be parameters that require grad
            torch._foreach_copy_(dsts, srcs)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event | None:
        """Copy ``src`` into ``dst``; for a CUDA source, returns the event that marks it done."""
        if src.device.type != "cuda":
            with torch.no_grad():
                dst.copy_(src)
            return None
        with self.ordered(src.device), torch.no_grad():
            stream = torch.cuda.current_stream(src.device)
            dst.copy_(src, non_blocking=dst.is_pinned())
            # The source may be freed by the caller once the copy is done, not before.
            src.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def ordered(self, device: torch.device) -> torch.cuda.StreamContext:
        """Run the block's device work on the side stream, after every kernel already queued on
        the training stream (the snapshot must see them all)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        if not self._pending:
            if self._start is not None:
                self._stream.wait_event(self._start)
            else:
                self._stream.wait_stream(torch.cuda.current_stream(device))
            self._pending = True
        return torch.cuda.stream(self._stream)

    def sync(self) -> None:
        if self._stream is not None and self._pending:
            self._stream.synchronize()
            self._pending = False
