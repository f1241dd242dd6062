"""Read the blocks a rank needs, verify, decode and copy them into the target tensors.

Each block is read with one ranged read (a pread, or a ranged GET on an object store), its checksum
checked before anything decodes it, decoded into a fresh buffer of the declared size (bounded by
the index validation) and copied into the part of the target it covers. Reads and decodes of different blocks run in parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import numpy as np
import torch

from shardckpt.codec import decode_block
from shardckpt.codec.checksum import checksum, chunk_checksums
from shardckpt.errors import CheckpointError, CorruptCheckpointError
from shardckpt.format.schema import DATA_HEADER_BYTES, RAW_CHUNK_BYTES, BlockEntry, CheckpointIndex, TensorEntry
from shardckpt.pipeline.datafile import check_header
from shardckpt.planning.boxes import Box
from shardckpt.planning.load_plan import BlockRead
from shardckpt.storage import Storage

T = TypeVar("T")


@dataclass
class ReadRequest:
    entry: TensorEntry
    needed: Box
    target: torch.Tensor  # holds exactly ``needed`` (once allocated)
    reads: list[BlockRead]
    # The target is an empty tensor that execute_reads resizes to ``needed``: a tensor created from
    # the index's word alone gets memory only after check_files (see execute_reads).
    allocate: bool = False


def check_files(storage: Storage, index: CheckpointIndex, file_ids: set[int], where: str) -> None:
    """Size and header of every data file this rank will read."""
    for i in sorted(file_ids):
        f = index.files[i]
        # Header first: a swapped file is reported as swapped even when its size differs too.
        actual = storage.size(f.name)
        if actual >= DATA_HEADER_BYTES:
            check_header(storage.read_range(f.name, 0, DATA_HEADER_BYTES), index.save_id, f.rank, f"{where}/{f.name}")
        if actual != f.size:
            raise CorruptCheckpointError(
                f"{where}: data file {f.name} (rank {f.rank}) is {actual} bytes, the index says {f.size} "
                f"({'truncated' if actual < f.size else 'has extra bytes'})"
            )


def _fetch(
    storage: Storage, index: CheckpointIndex, entry: TensorEntry, read: BlockRead, where: str,
    into: np.ndarray | None = None,
) -> bytes | np.ndarray:
    """A block's stored bytes, checksum verified before anything decodes them. A raw block whose
    destination is known is read straight into it (``into``)."""
    b = read.block
    name = index.files[b.file].name
    payload: bytes | np.ndarray
    if into is not None and b.codec == "raw":
        storage.read_into(name, b.offset, memoryview(into))  # type: ignore[arg-type]
        payload = into
    else:
        payload = storage.read_range(name, b.offset, b.length)
    if checksum(payload) != b.checksum:  # type: ignore[arg-type]
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch in {name} (rank {index.files[b.file].rank}) at offset {b.offset} for "
            f"tensor {entry.key!r} block {list(b.offsets)}+{list(b.sizes)}"
        )
    return payload


def _decode(entry: TensorEntry, read: BlockRead, payload: bytes | np.ndarray, out: np.ndarray, where: str) -> None:
    try:
        decode_block(read.block.codec, payload, out, entry.torch_dtype.itemsize)  # type: ignore[arg-type]
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{where}: tensor {entry.key!r} block at offset {read.block.offset}: {e}") from e


def read_block(storage: Storage, index: CheckpointIndex, entry: TensorEntry, read: BlockRead, where: str) -> torch.Tensor:
    """One verified, decoded block as a tensor of its box's shape."""
    out = np.empty(read.block.raw_length, dtype=np.uint8)
    # A raw block is read straight into its buffer: reading it into bytes and then "decoding"
    # (copying) those would cost a second pass over every block a re-sharded load only partly
    # needs. The checksum is still over the whole stored block, verified in _fetch.
    payload = _fetch(storage, index, entry, read, where, into=out)
    if payload is not out:
        _decode(entry, read, payload, out, where)
    return torch.from_numpy(out).view(entry.torch_dtype).reshape(read.block.sizes)


def read_block_part(storage: Storage, index: CheckpointIndex, entry: TensorEntry, read: BlockRead, where: str) -> torch.Tensor:
    """A raw block with chunk checksums, of which only the chunks that hold ``read.overlap`` are
    read and verified: a tensor of the block's shape whose other bytes are undefined."""
    b = read.block
    lo, hi = _byte_span(read.box, read.overlap, entry.torch_dtype.itemsize)
    first, end = lo // RAW_CHUNK_BYTES, -(-hi // RAW_CHUNK_BYTES)
    start, stop = first * RAW_CHUNK_BYTES, min(end * RAW_CHUNK_BYTES, b.length)
    out = np.empty(b.raw_length, dtype=np.uint8)  # pages outside [start, stop) are never touched
    storage.read_into(index.files[b.file].name, b.offset + start, memoryview(out[start:stop]))  # type: ignore[arg-type]
    for c in range(first, end):
        _check_chunk(index, entry, b, c, out[c * RAW_CHUNK_BYTES : _chunk_end(b, c)], where)
    return torch.from_numpy(out).view(entry.torch_dtype).reshape(b.sizes)


def read_run_into(
    storage: Storage, index: CheckpointIndex, entry: TensorEntry, block: BlockEntry, lo: int, hi: int,
    dest: np.ndarray, where: str,
) -> None:
    """Bytes ``[lo, hi)`` of a raw block with chunk checksums into ``dest``, each chunk they touch
    verified. The chunks inside the run are read straight into ``dest``; only the (at most two)
    chunks at its ends, which hold bytes outside it, go through a chunk-sized buffer."""
    inner = [c for c in range(lo // RAW_CHUNK_BYTES, -(-hi // RAW_CHUNK_BYTES))
             if lo <= c * RAW_CHUNK_BYTES and _chunk_end(block, c) <= hi]
    name = index.files[block.file].name
    if inner:
        a, z = inner[0] * RAW_CHUNK_BYTES, _chunk_end(block, inner[-1])
        storage.read_into(name, block.offset + a, memoryview(dest[a - lo : z - lo]))  # type: ignore[arg-type]
        for c in inner:
            _check_chunk(index, entry, block, c, dest[c * RAW_CHUNK_BYTES - lo : _chunk_end(block, c) - lo], where)
    for c in {lo // RAW_CHUNK_BYTES, (hi - 1) // RAW_CHUNK_BYTES} - set(inner):
        a, z = c * RAW_CHUNK_BYTES, _chunk_end(block, c)
        chunk = np.empty(z - a, dtype=np.uint8)
        storage.read_into(name, block.offset + a, memoryview(chunk))  # type: ignore[arg-type]
        _check_chunk(index, entry, block, c, chunk, where)
        keep_lo, keep_hi = max(a, lo), min(z, hi)
        dest[keep_lo - lo : keep_hi - lo] = chunk[keep_lo - a : keep_hi - a]


def _chunk_end(block: BlockEntry, c: int) -> int:
    """Where chunk ``c`` of a raw block ends (the last chunk may be short)."""
    return min((c + 1) * RAW_CHUNK_BYTES, block.length)


def _check_chunk(index: CheckpointIndex, entry: TensorEntry, b: BlockEntry, c: int, data: np.ndarray, where: str) -> None:
    if checksum(data) != b.chunk_checksum(c):  # type: ignore[arg-type]
        f = index.files[b.file]
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch in {f.name} (rank {f.rank}) at offset "
            f"{b.offset + c * RAW_CHUNK_BYTES} (chunk {c} of the block at offset {b.offset}) for tensor "
            f"{entry.key!r} block {list(b.offsets)}+{list(b.sizes)}"
        )


def _byte_span(box: Box, part: Box, itemsize: int) -> tuple[int, int]:
    """The bytes of a C-ordered ``box`` from ``part``'s first element to past its last."""
    first = last = 0
    for o, s, bo, bs in zip(part.offsets, part.sizes, box.offsets, box.sizes):
        first = first * bs + (o - bo)
        last = last * bs + (o + s - 1 - bo)
    return first * itemsize, (last + 1) * itemsize


def read_checked_block(storage: Storage, index: CheckpointIndex, entry: TensorEntry, read: BlockRead, where: str) -> torch.Tensor:
    """``read_block``, and a raw block's chunk checksums checked too (``verify``: a partial load
    trusts them, so they must agree with the bytes the block checksum vouches for)."""
    block = read.block
    out = read_block(storage, index, entry, read, where)
    if block.chunks and chunk_checksums(out.reshape(-1).view(torch.uint8).numpy(), RAW_CHUNK_BYTES) != block.chunks:  # type: ignore[arg-type]
        f = index.files[block.file]
        raise CorruptCheckpointError(
            f"{where}: tensor {entry.key!r} block {list(block.offsets)}+{list(block.sizes)} in {f.name} (rank "
            f"{f.rank}) at offset {block.offset}: its chunk checksums do not match its bytes, though its block "
            "checksum does"
        )
    return out


def execute_reads(
    storage: Storage, index: CheckpointIndex, requests: list[ReadRequest], pool: ThreadPoolExecutor, where: str
) -> None:
    """Fill every request's target. Call it after ``check_files`` for the files the requests read:
    the targets it allocates are as large as the index says, which validation bounds by the
    declared file sizes, and only check_files makes those the real ones."""
    for req in requests:
        if req.allocate:
            req.target.resize_(req.needed.sizes)
            req.allocate = False
    # In file order: the reads run in parallel threads, and submitted in the order of the state's
    # tensors they would look random to the kernel's readahead (measured: a cold load 1.4x slower).
    jobs = sorted(((req, read) for req in requests for read in req.reads),
                  key=lambda j: (j[1].block.file, j[1].block.offset))
    futures = [pool.submit(read_into_target, storage, index, req, read, where) for req, read in jobs]
    raise_first_failure(futures, where)


def raise_first_failure(futures: list[Future[T]], where: str) -> list[T]:
    """Wait for every job (none may still touch a file being closed), then raise the first
    failure as a CheckpointError; returns the results otherwise."""
    wait(futures)
    for f in futures:
        exc = f.exception()
        if exc is not None:
            _reraise(exc, where)
    return [f.result() for f in futures]


def run_bounded(pool: ThreadPoolExecutor, jobs: Iterable[Callable[[], object]], limit: int, where: str) -> None:
    """Run ``jobs`` with at most ``limit`` submitted at a time, dropping each result as it
    completes, so memory stays bounded however many jobs there are (``verify`` decodes every block
    of a checkpoint). At the first failure nothing more is submitted; the jobs in flight are waited
    for (none may still touch a file being closed) and the failure is raised as a CheckpointError."""
    pending: set[Future[object]] = set()
    failure: BaseException | None = None
    todo = iter(jobs)
    while True:
        while failure is None and len(pending) < limit:
            job = next(todo, None)
            if job is None:
                break
            pending.add(pool.submit(job))
        if not pending:
            break
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            if failure is None:
                failure = f.exception()
    if failure is not None:
        _reraise(failure, where)


def _reraise(exc: BaseException, where: str) -> NoReturn:
    if isinstance(exc, CheckpointError):
        raise exc
    raise CheckpointError(f"{where}: reading failed: {type(exc).__name__}: {exc}") from exc


def _target_bytes(req: ReadRequest, box: Box) -> np.ndarray | None:
    """The target's bytes for ``box``, when they are one contiguous CPU region of the stored dtype
    (another dtype: load(dtype_cast=True), cast by place_block's copy_)."""
    if req.target.device.type != "cpu" or req.target.dtype != req.entry.torch_dtype:
        return None
    region = req.target[box.slices_within(req.needed)] if box.sizes else req.target
    if not region.is_contiguous():
        return None
    return region.reshape(-1).view(torch.uint8).numpy()


def _direct_destination(req: ReadRequest, read: BlockRead) -> np.ndarray | None:
    """The target's bytes for this block, when the whole block lands in one contiguous CPU region:
    then the block is read or decoded straight into the target, with no staging copy."""
    return _target_bytes(req, read.box) if read.overlap == read.box else None


def read_into_target(storage: Storage, index: CheckpointIndex, req: ReadRequest, read: BlockRead, where: str) -> None:
    """Read, verify and decode one block into the part of ``req.target`` it covers."""
    dest = _direct_destination(req, read)
    if dest is not None:
        payload = _fetch(storage, index, req.entry, read, where, into=dest)
        if payload is not dest:
            _decode(req.entry, read, payload, dest, where)
        return
    partial = read.block.chunks and read.overlap != read.box and read.box.sizes
    run = _direct_run(req, read) if partial else None
    if run is not None:
        read_run_into(storage, index, req.entry, read.block, *run, where)
        return
    reader = read_block_part if partial else read_block
    place_block(req, read, reader(storage, index, req.entry, read, where))


def _direct_run(req: ReadRequest, read: BlockRead) -> tuple[int, int, np.ndarray] | None:
    """For a partly needed raw block whose needed part is one run of bytes both in the block (C
    order: a band of whole rows, as when a Shard(0) save loads at another world size) and in the
    target: the run's bytes in the block and the target's bytes it goes to."""
    itemsize = req.entry.torch_dtype.itemsize
    lo, hi = _byte_span(read.box, read.overlap, itemsize)
    if hi - lo != read.overlap.volume * itemsize:
        return None
    dest = _target_bytes(req, read.overlap)
    return None if dest is None else (lo, hi, dest)


def place_block(req: ReadRequest, read: BlockRead, block: torch.Tensor) -> None:
    """Copy the part of a decoded block (a tensor of the block's shape) that ``req`` needs into its target."""
    src = block[read.overlap.slices_within(read.box)] if read.box.sizes else block
    with torch.no_grad():  # the target may be a parameter (or a view of one) that requires grad
        if read.overlap.sizes:
            req.target[read.overlap.slices_within(req.needed)].copy_(src)
        else:
            req.target.copy_(src)
