"""Which stored blocks each rank reads: the blocks of a tensor that overlap the box it needs."""

from __future__ import annotations

from dataclasses import dataclass

from shardckpt.errors import IncompleteCheckpointError, IndexFormatError
from shardckpt.format.schema import BlockEntry, TensorEntry
from shardckpt.planning.boxes import Box, TooIrregular, find_overlap


@dataclass(frozen=True)
class BlockRead:
    block: BlockEntry
    box: Box  # the block's box
    overlap: Box  # the part of it this rank needs


def plan_reads(entry: TensorEntry, needed: Box, where: str) -> list[BlockRead]:
    """Blocks of ``entry`` that overlap ``needed``; raises when they leave any needed element
    uncovered or overlap each other (which only a corrupt or hostile index can produce)."""
    reads: list[BlockRead] = []
    for block in entry.blocks:
        box = Box(block.offsets, block.sizes)
        overlap = box.intersect(needed)
        if overlap is not None:
            reads.append(BlockRead(block, box, overlap))
    try:
        clash = find_overlap([r.box for r in reads])
    except TooIrregular as e:
        raise IndexFormatError(f"{where}: tensor {entry.key!r}: {e}") from None
    if clash is not None:
        raise IndexFormatError(f"{where}: tensor {entry.key!r} has overlapping blocks {clash[0]} and {clash[1]}")
    covered = sum(r.overlap.volume for r in reads)
    if covered != needed.volume:
        raise IncompleteCheckpointError(
            f"{where}: tensor {entry.key!r} is incomplete: stored blocks cover {covered} of the "
            f"{needed.volume} elements needed (box {list(needed.offsets)}+{list(needed.sizes)})"
        )
    return reads
