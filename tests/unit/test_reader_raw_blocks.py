"""Raw blocks that a load only partly needs (re-sharded loads) are read straight into their block
buffer, with no bytes object in between, and still verified against the block checksum."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import CorruptCheckpointError
from shardckpt.pipeline.reader import read_block
from shardckpt.planning.boxes import Box
from shardckpt.planning.load_plan import BlockRead
from shardckpt.storage.local import LocalStorage

pytestmark = pytest.mark.timeout(60)

RAW = shardckpt.CompressionOptions(codec="none", block_bytes=16 << 10)


class _NoRangedDataReads(LocalStorage):
    """Refuses ``read_range`` on data files: a raw block must come in through ``read_into``."""

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if name.startswith("data"):
            raise AssertionError(f"ranged read of {name} at {offset}: a raw block was copied through bytes")
        return super().read_range(name, offset, length)


def _saved(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))  # four 16 KiB raw blocks
    path = tmp_path / "ckpt"
    shardckpt.save({"w": w}, path, compression=RAW)
    return path, w


def _reads(path: Path) -> tuple[object, object, list[BlockRead]]:
    index = shardckpt.read_index(path)
    entry = next(e for e in index.tensors if e.key == "w")
    assert {b.codec for b in entry.blocks} == {"raw"} and len(entry.blocks) > 1
    # Column half of every row, as a Shard(1) target of a Shard(0) save needs it.
    needed = Box((0, 32), (256, 32))
    reads = []
    for b in entry.blocks:
        box = Box(b.offsets, b.sizes)
        overlap = box.intersect(needed)
        assert overlap is not None and overlap != box
        reads.append(BlockRead(b, box, overlap))
    return index, entry, reads


def test_partly_needed_raw_block_is_read_into_its_buffer(tmp_path):
    path, w = _saved(tmp_path)
    index, entry, reads = _reads(path)
    storage = _NoRangedDataReads(path)
    for r in reads:
        got = read_block(storage, index, entry, r, str(path))  # type: ignore[arg-type]
        want = w[r.box.slices_within(Box((0, 0), tuple(w.shape)))]
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


def test_corrupt_raw_block_read_into_its_buffer_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    index, entry, reads = _reads(path)
    r = reads[1]
    f = index.files[r.block.file]
    with open(path / f.name, "r+b") as fh:
        fh.seek(r.block.offset + r.block.length // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(CorruptCheckpointError) as info:
        read_block(LocalStorage(path), index, entry, r, str(path))  # type: ignore[arg-type]
    msg = str(info.value)
    for needle in (str(path), "checksum mismatch", f.name, f"rank {f.rank}", f"offset {r.block.offset}", "'w'"):
        assert needle in msg, f"{needle!r} not in {msg}"
