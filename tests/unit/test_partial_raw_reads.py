"""A raw block larger than a chunk (1 MiB) carries a checksum per chunk, and a load that needs only
part of the block (a re-sharded load) reads and verifies only the chunks it overlaps (issue 11,
item 5). The chunk checksums are index fields like any other: malformed ones are refused, ones that
disagree with the data are caught by the partial read that trusts them and by ``verify``."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import shardckpt
from shardckpt import CorruptCheckpointError, IndexFormatError
from shardckpt.format.schema import RAW_CHUNK_BYTES
from shardckpt.planning.boxes import Box
from shardckpt.storage.local import LocalStorage

pytestmark = pytest.mark.timeout(120)

ROWS, COLS = 2048, 1024  # fp32: 4 KiB rows, 8 MiB in all: two 4 MiB raw blocks of 1024 rows
ROW = COLS * 4


@pytest.fixture
def saved(tmp_path) -> tuple[Path, torch.Tensor]:
    w = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "ckpt"
    shardckpt.save({"w": w}, path, compression="none")
    return path, w


@pytest.fixture
def bytes_read(monkeypatch) -> list[int]:
    """Counts the bytes every LocalStorage read takes from a data file (its 64-byte header aside)."""
    got: list[int] = []
    lock = threading.Lock()
    read_into, read_range = LocalStorage.read_into, LocalStorage.read_range

    def counted_into(self, name, offset, buf):
        with lock:
            got.append(len(buf)) if name.startswith("data") and offset else None
        return read_into(self, name, offset, buf)

    def counted_range(self, name, offset, length):
        with lock:
            got.append(length) if name.startswith("data") and offset else None
        return read_range(self, name, offset, length)

    monkeypatch.setattr(LocalStorage, "read_into", counted_into)
    monkeypatch.setattr(LocalStorage, "read_range", counted_range)
    return got


def _read_rows(path: Path, lo: int, hi: int) -> torch.Tensor:
    with shardckpt.CheckpointReader(path) as reader:
        entry = next(e for e in reader.index.tensors if e.key == "w")
        return reader.read(entry, Box((lo, 0), (hi - lo, COLS)))


def _flip(path: Path, offset: int) -> None:
    data = next((path / "data").iterdir())
    with open(data, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))


def _blocks(path: Path) -> list[list[object]]:
    doc = json.loads((path / "index.json").read_bytes())
    return next(t for t in doc["tensors"] if t["key"] == "w")["blocks"]


def test_raw_blocks_carry_one_checksum_per_chunk(saved):
    path, _ = saved
    blocks = _blocks(path)
    assert [b[6] for b in blocks] == ["raw", "raw"]
    assert all(len(b) == 9 and len(b[8]) == 16 * (4 << 20) // RAW_CHUNK_BYTES for b in blocks)


def test_a_partly_needed_raw_block_reads_only_the_chunks_it_overlaps(saved, bytes_read):
    path, w = saved
    # Rows 1000..1099: the last 24 rows of block 0 (all in its chunk 3) and the first 76 rows of
    # block 1 (all in its chunk 0). Whole blocks would be 8 MiB.
    got = _read_rows(path, 1000, 1100)
    assert torch.equal(got, w[1000:1100])
    assert sum(bytes_read) == 2 * RAW_CHUNK_BYTES


def test_a_whole_needed_block_is_read_once(saved, bytes_read):
    path, w = saved
    assert torch.equal(_read_rows(path, 0, 1024), w[:1024])
    assert sum(bytes_read) == 4 << 20


def test_a_corrupt_chunk_that_the_load_needs_is_refused(saved):
    path, _ = saved
    header = _blocks(path)[1][3]  # block 1's offset in the data file
    _flip(path, header + 10 * ROW)  # row 1034: chunk 0 of block 1
    with pytest.raises(CorruptCheckpointError) as info:
        _read_rows(path, 1000, 1100)
    msg = str(info.value)
    for needle in (str(path), "checksum mismatch", "chunk 0", "'w'", "rank 0"):
        assert needle in msg, f"{needle!r} not in {msg}"


def test_a_corrupt_chunk_the_load_skips_is_caught_by_verify(saved):
    path, w = saved
    _flip(path, _blocks(path)[1][3] + 900 * ROW)  # row 1924: chunk 3 of block 1, not read below
    assert torch.equal(_read_rows(path, 1000, 1100), w[1000:1100])
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        shardckpt.verify(path)


def _edit_blocks(path: Path, edit) -> None:
    doc = json.loads((path / "index.json").read_bytes())
    blocks = next(t for t in doc["tensors"] if t["key"] == "w")["blocks"]
    edit(blocks)
    (path / "index.json").write_text(json.dumps(doc))


def test_chunk_checksums_that_disagree_with_the_data_are_refused_by_the_read_and_by_verify(saved):
    path, _ = saved

    def swap_first_two(blocks):
        sums = blocks[1][8]
        blocks[1][8] = sums[16:32] + sums[:16] + sums[32:]

    _edit_blocks(path, swap_first_two)
    with pytest.raises(CorruptCheckpointError, match="chunk 0"):
        _read_rows(path, 1000, 1100)
    with pytest.raises(CorruptCheckpointError, match="chunk checksums do not match"):
        shardckpt.verify(path)


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda b: b[0].__setitem__(8, b[0][8][:-16]), "must be 4 checksums"),
        (lambda b: b[0].__setitem__(8, b[0][8][:-1] + "g"), "must be 4 checksums"),
        (lambda b: b[0].__setitem__(8, ""), "empty chunk checksum"),
        (lambda b: b[0].__setitem__(8, 7), "chunks"),
        (lambda b: b[0].__setitem__(6, "zstd"), "not a raw block"),
        (lambda b: b[0].append("0" * 16), "must have 8 fields"),
    ],
)
def test_malformed_chunk_checksums_are_an_index_format_error(saved, edit, reason):
    path, _ = saved
    _edit_blocks(path, edit)
    with pytest.raises(IndexFormatError, match=reason) as info:
        shardckpt.read_index(path)
    assert str(path) in str(info.value) and "'w'" in str(info.value)


def test_an_index_without_chunk_checksums_still_loads_whole_blocks(saved, bytes_read):
    # Checkpoints written before chunk checksums existed: 8-field blocks, read whole.
    path, w = saved
    _edit_blocks(path, lambda blocks: [b.pop() for b in blocks])
    assert torch.equal(_read_rows(path, 1000, 1100), w[1000:1100])
    assert sum(bytes_read) == 8 << 20
    shardckpt.verify(path)



@pytest.fixture
def reads_into(monkeypatch) -> list[tuple[int, int]]:
    """(address, length) of every buffer a data-file read fills."""
    got: list[tuple[int, int]] = []
    lock = threading.Lock()
    read_into = LocalStorage.read_into

    def recorded(self, name, offset, buf):
        with lock:
            if name.startswith("data") and offset:
                got.append((np.frombuffer(buf, dtype=np.uint8).ctypes.data, len(buf)))
        return read_into(self, name, offset, buf)

    monkeypatch.setattr(LocalStorage, "read_into", recorded)
    return got


@pytest.mark.parametrize("lo, hi", [(100, 1000), (100, 1024), (0, 1000), (300, 1800), (1030, 1040), (1, 2047)])
def test_a_band_of_rows_goes_straight_into_the_target_but_the_edge_chunks(saved, reads_into, lo, hi):
    """A band of whole rows is one run of bytes in each block and in the target: the chunks inside
    the run are read into the target itself, the edge chunks (holding rows outside it) through a
    buffer of their own. Every chunk touched is read once."""
    path, w = saved
    got = _read_rows(path, lo, hi)
    assert torch.equal(got, w[lo:hi])
    start, end = got.data_ptr(), got.data_ptr() + got.numel() * 4
    into_target = sum(n for addr, n in reads_into if start <= addr and addr + n <= end)
    per_block = 1024 * ROW
    inner = edges = 0
    for b in range(2):
        a, z = max(lo * ROW - b * per_block, 0), min(hi * ROW - b * per_block, per_block)
        if a >= z:
            continue
        chunks = range(a // RAW_CHUNK_BYTES, -(-z // RAW_CHUNK_BYTES))
        full = [c for c in chunks if a <= c * RAW_CHUNK_BYTES and (c + 1) * RAW_CHUNK_BYTES <= z]
        inner += len(full) * RAW_CHUNK_BYTES
        edges += (len(chunks) - len(full)) * RAW_CHUNK_BYTES
    assert into_target == inner
    assert sum(n for _, n in reads_into) == inner + edges


@pytest.mark.parametrize("row, chunk", [(500, 1), (30, 0)])
def test_a_corrupt_chunk_read_straight_into_the_target_is_refused(saved, row, chunk):
    path, _ = saved
    _flip(path, _blocks(path)[0][3] + row * ROW)  # chunk 1 lies inside rows 100..1000; chunk 0 at its edge
    with pytest.raises(CorruptCheckpointError) as info:
        _read_rows(path, 100, 1000)
    msg = str(info.value)
    for needle in (str(path), "checksum mismatch", f"chunk {chunk} ", "'w'", "rank 0"):
        assert needle in msg, f"{needle!r} not in {msg}"
