"""Encode staged tensors into blocks and append them to this rank's data file, in a thread pool.

zstd and numpy release the GIL, so encoder threads run in parallel and overlap with each other's
writes; offsets are reserved in the data file so blocks land wherever a thread finishes first.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from shardckpt.codec import encode_block
from shardckpt.codec.checksum import checksum
from shardckpt.options import CompressionOptions
from shardckpt.planning.boxes import Box, split_box
from shardckpt.planning.save_plan import WriteItem
from shardckpt.storage import DataFileWriter


@dataclass
class StagedWrite:
    """A write item's bytes, CPU-resident and contiguous, holding exactly ``item.box``."""

    item: WriteItem
    dtype: str
    data: torch.Tensor


def source_view(local: torch.Tensor, local_box: Box, box: Box) -> torch.Tensor:
    """The part of a rank's local tensor that holds ``box`` (a view, no copy)."""
    return local[box.slices_within(local_box)] if box.sizes else local


def write_blocks(
    staged: list[StagedWrite], out: DataFileWriter, options: CompressionOptions, pool: ThreadPoolExecutor
) -> list[list[object]]:
    """Write every block; returns block records ``[key, entry_rank, offsets, sizes, offset, length,
    raw_length, codec, checksum]`` in a stable order."""
    futures: list[Future[list[object]]] = []
    for sw in staged:
        raw = sw.data.reshape(-1).view(torch.uint8).numpy()
        itemsize = sw.data.element_size()
        for piece in split_box(sw.item.box, itemsize, options.block_bytes):
            lo = piece.start * itemsize
            chunk = raw[lo : lo + piece.box.volume * itemsize]
            futures.append(pool.submit(_write_one, sw, piece.box, chunk, itemsize, out, options))
    wait(futures)  # let every thread finish before the first error propagates and the file closes
    return [f.result() for f in futures]


def _write_one(
    sw: StagedWrite, box: Box, chunk: object, itemsize: int, out: DataFileWriter, options: CompressionOptions
) -> list[object]:
    codec, payload = encode_block(chunk, sw.dtype, itemsize, options.codec, options.level)  # type: ignore[arg-type]
    digest = checksum(payload)
    offset = out.append(payload)
    return [sw.item.key, sw.item.entry_rank, list(box.offsets), list(box.sizes), offset, len(payload),
            box.volume * itemsize, codec, digest]
