"""Encode staged tensors into blocks and append them to this rank's data file, in a thread pool.

zstd and numpy release the GIL, so encoder threads run in parallel and overlap with each other's
writes; offsets are reserved in the data file so blocks land wherever a thread finishes first.
Staged items may arrive while earlier ones are being written (a streaming save), and each item's
buffer is handed back as soon as its last block is on its way to disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from shardckpt.codec import encode_block
from shardckpt.codec.checksum import checksum
from shardckpt.options import CompressionOptions
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
) -> list[list[object]]:
    """Write every block; returns block records ``[key, entry_rank, offsets, sizes, offset, length,
    raw_length, codec, checksum]`` in submission order. ``on_written(sw)`` runs once all of an
    item's blocks are written (its buffer may then be reused)."""
    futures: list[Future[list[object]]] = []
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
                f = pool.submit(_write_one, sw, piece.box, chunk, itemsize, out, options)
                f.add_done_callback(finished)
                futures.append(f)
    finally:
        wait(futures)  # let every thread finish before an error propagates and the file closes
    return [f.result() for f in futures]


def _write_one(
    sw: StagedWrite, box: Box, chunk: np.ndarray, itemsize: int, out: DataWriter, options: CompressionOptions
) -> list[object]:
    codec, payload = encode_block(chunk, sw.dtype, itemsize, options.codec, options.level)
    digest = checksum(payload)
    offset = out.append(payload)
    return [sw.item.key, sw.item.entry_rank, list(box.offsets), list(box.sizes), offset, len(payload),
            box.volume * itemsize, codec, digest]
