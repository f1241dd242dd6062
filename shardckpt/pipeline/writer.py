"""Encode staged tensors into blocks and append them to this rank's data file, in a thread pool.

zstd and numpy release the GIL, so encoder threads run in parallel and overlap with each other's
writes; offsets are reserved in the data file so blocks land wherever a thread finishes first.
Staged items may arrive while earlier ones are being written (a streaming save), and each item's
buffer is handed back as soon as its last block is on its way to disk.

With ``codec="auto"`` each block asks the save's ``SaveBalance`` (``shardckpt.pipeline.adaptive``)
whether to compress, and reports its encode CPU time and how its write split into CPU, waiting
for a core and waiting for the storage;
``finish_data`` times the final fsync / upload so the next save knows the sink's real speed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from shardckpt.codec import encode_block
from shardckpt.codec.checksum import checksum, chunk_checksums
from shardckpt.format.schema import RAW_CHUNK_BYTES
from shardckpt.options import CompressionOptions
from shardckpt.pipeline.adaptive import SaveBalance, balance_for, run_delay
from shardckpt.planning.boxes import Box, split_box
from shardckpt.planning.save_plan import WriteItem
from shardckpt.storage import DataWriter


@dataclass
class StagedWrite:
    """A write item's bytes, CPU-resident and contiguous, holding exactly ``item.box``."""

    item: WriteItem
    dtype: str
    data: torch.Tensor
    ready: torch.cuda.Event | None = None  # set while a device-to-host copy is in flight
    pooled: bool = False  # the buffer belongs to a StagingPool and goes back after writing


def source_view(local: torch.Tensor, local_box: Box, box: Box) -> torch.Tensor:
    """The part of a rank's local tensor that holds ``box`` (a view, no copy)."""
    return local[box.slices_within(local_box)] if box.sizes else local


def write_blocks(
    staged: Iterable[StagedWrite],
    out: DataWriter,
    options: CompressionOptions,
    pool: ThreadPoolExecutor,
    on_written: Callable[[StagedWrite], None] | None = None,
    background: bool = False,
) -> list[list[object]]:
    """Write every block; returns block records ``[key, entry_rank, offsets, sizes, offset, length,
    raw_length, codec, checksum, chunks]`` in submission order. ``on_written(sw)`` runs once all of an
    item's blocks are written (its buffer may then be reused). ``background``: the save runs beside
    the training loop, and the ``"auto"`` codec prices its CPU time (pipeline/adaptive.py)."""
    futures: list[Future[list[object]]] = []
    balance = None
    if options.codec == "auto":
        balance = balance_for(storage_kind(out)).start_save(background=background)
        with _open_lock:
            _open_balances[id(out)] = balance  # finish_data folds the sink time in
    try:
        for sw in staged:
            if sw.ready is not None:
                sw.ready.synchronize()
            raw = sw.data.reshape(-1).view(torch.uint8).numpy()
            itemsize = sw.data.element_size()
            pieces = split_box(sw.item.box, itemsize, options.block_bytes)
            remaining = [len(pieces)]
            lock = threading.Lock()

            def finished(_: Future[list[object]], sw: StagedWrite = sw, remaining: list[int] = remaining,
                         lock: threading.Lock = lock) -> None:
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last and on_written is not None:
                    on_written(sw)

            if not pieces and on_written is not None:
                on_written(sw)
            for piece in pieces:
                lo = piece.start * itemsize
                chunk = raw[lo : lo + piece.box.volume * itemsize]
                f = pool.submit(_write_one, sw, piece.box, chunk, itemsize, out, options, balance)
                f.add_done_callback(finished)
                futures.append(f)
    except BaseException:
        with _open_lock:
            _open_balances.pop(id(out), None)  # the save fails; its timings teach nothing
        raise
    finally:
        wait(futures)  # let every thread finish before an error propagates and the file closes
    return [f.result() for f in futures]


_open_balances: dict[int, SaveBalance] = {}  # id(writer) -> its save's balance, until finish_data
_open_lock = threading.Lock()


def storage_kind(out: DataWriter) -> str:
    """The key under which a sink's measured speed is kept: the writer's type (local file, S3
    upload, a test's wrapper), so one kind's speed never steers another's saves."""
    t = type(out)
    return f"{t.__module__}.{t.__qualname__}"


def finish_data(out: DataWriter) -> int:
    """``out.finish()``, timed for the adaptive policy when ``write_blocks`` balanced this save."""
    with _open_lock:
        balance = _open_balances.pop(id(out), None)
    if balance is None:
        return out.finish()
    t0 = time.perf_counter()
    size = out.finish()
    balance.finished(time.perf_counter() - t0)
    return size


def _write_one(
    sw: StagedWrite, box: Box, chunk: np.ndarray, itemsize: int, out: DataWriter, options: CompressionOptions,
    balance: SaveBalance | None,
) -> list[object]:
    if balance is None:
        codec, payload = encode_block(chunk, sw.dtype, itemsize, options.codec, options.level)
        digest = checksum(payload)
        offset = out.append(payload)
    else:
        compress = balance.choose(chunk.nbytes)
        q0, t0 = run_delay(), time.thread_time()  # this thread's CPU only: other threads and ranks do not count
        codec, payload = encode_block(chunk, sw.dtype, itemsize, "zstd" if compress else "none", options.level)
        digest = checksum(payload)
        balance.record_block(chunk.nbytes, len(payload), time.thread_time() - t0, compress, run_delay() - q0)
        balance.sink_enter()
        queued, cpu, wall = run_delay(), time.thread_time(), time.perf_counter()
        try:
            offset = out.append(payload)
        finally:
            balance.sink_exit(len(payload), time.perf_counter() - wall, time.thread_time() - cpu, run_delay() - queued)
    chunks = chunk_checksums(payload, RAW_CHUNK_BYTES) if codec == "raw" and len(payload) > RAW_CHUNK_BYTES else ""
    return [sw.item.key, sw.item.entry_rank, list(box.offsets), list(box.sizes), offset, len(payload),
            box.volume * itemsize, codec, digest, chunks]
