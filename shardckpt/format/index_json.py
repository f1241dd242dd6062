"""Index encode/decode. Decoding validates every field before anything trusts it.

A hostile index must never cause an unbounded allocation, a path outside the checkpoint, or a
stray KeyError/TypeError: every check below raises ``IndexFormatError`` naming the field (or
``IncompleteCheckpointError`` for a tensor its blocks do not cover).

What the index declares is bounded by the bytes it points at: blocks are disjoint ranges inside
their data files, each decodes to at most ``max_raw_for_stored`` raw bytes, and each tensor is
exactly as large as its blocks. So the raw bytes of all tensors together are at most the sum of
the declared file sizes times ``ZSTD_MAX_RATIO``, and once a reader has checked the real sizes of
the data files (``pipeline.reader.check_files``), allocating the declared shapes is safe.
"""

from __future__ import annotations

import json
import math
import re
from typing import TypeVar

from shardckpt.codec.limits import max_raw_for_stored
from shardckpt.errors import IncompleteCheckpointError, IndexFormatError
from shardckpt.format.schema import (
    CHECKSUM_HEX,
    CODECS,
    DATA_DIR,
    DATA_HEADER_BYTES,
    DTYPE_ITEMSIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_PATH_PARTS,
    RAW_CHUNK_BYTES,
    BlockEntry,
    CheckpointIndex,
    FileEntry,
    PathPart,
    TensorEntry,
    ValueEntry,
    path_part_problem,
)
from shardckpt.format.values import decode_value

MAX_INDEX_BYTES = 1 << 30
MAX_NDIM = 64
# Largest element count / byte count / block size accepted from an index; a block is decoded into
# memory whole, so its raw size bounds one allocation.
MAX_DIM = 1 << 48
MAX_BYTES = 1 << 56
MAX_BLOCK_RAW = 1 << 31
# fullmatch everywhere: "$" would also accept a trailing newline.
_FILE_NAME = re.compile(rf"{DATA_DIR}/[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,199}}")
_CHECKSUM = re.compile(r"[0-9a-f]{16}")
_HEX = re.compile(r"[0-9a-f]+")
_SAVE_ID = re.compile(r"[0-9a-f]{8,48}")  # the data file header holds 48 bytes

T = TypeVar("T")


def encode_index(index: CheckpointIndex) -> bytes:
    doc = {
        "format": FORMAT_NAME,
        "version": index.version,
        "save_id": index.save_id,
        "world_size": index.world_size,
        "metadata": index.metadata,
        "files": [{"name": f.name, "rank": f.rank, "size": f.size} for f in index.files],
        "tensors": [_encode_tensor(t) for t in index.tensors],
        "values": [
            {"key": v.key, "path": list(v.path), "rank": v.rank, "value": v.value} for v in index.values
        ],
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _encode_tensor(t: TensorEntry) -> dict[str, object]:
    return {
        "key": t.key,
        "path": list(t.path),
        "rank": t.rank,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "blocks": [
            [list(b.offsets), list(b.sizes), b.file, b.offset, b.length, b.raw_length, b.codec, b.checksum]
            + ([b.chunks] if b.chunks else [])
            for b in t.blocks
        ],
    }


def decode_index(data: bytes, where: str) -> CheckpointIndex:
    """Parse and validate index bytes read from ``where`` (used in every message)."""
    if len(data) > MAX_INDEX_BYTES:
        raise IndexFormatError(f"{where}: index is {len(data)} bytes, over the {MAX_INDEX_BYTES} limit")
    try:
        # Strict UTF-8: json.loads(bytes) would also take UTF-16/32, a byte order mark, and UTF-8
        # encoded surrogates. (UnicodeDecodeError is a ValueError.)
        text = data.decode("utf-8")
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise IndexFormatError(f"{where}: index is not valid JSON: {e}") from e
    doc = _typed(doc, dict, where, "index")
    if doc.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{where}: not a shardckpt index (format={doc.get('format')!r})")
    version = _int(doc.get("version"), where, "version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{where}: format version {version} is not supported (this reader: {FORMAT_VERSION})")
    save_id = _typed(doc.get("save_id"), str, where, "save_id")
    if not _SAVE_ID.fullmatch(save_id):
        raise IndexFormatError(f"{where}: bad save_id {save_id!r}")
    world_size = _int(doc.get("world_size"), where, "world_size", lo=1, hi=1 << 24)
    metadata = decode_value(_typed(doc.get("metadata", {}), dict, where, "metadata"), f"{where}: metadata")
    if not isinstance(metadata, dict):
        raise IndexFormatError(f"{where}: field metadata must decode to an object")
    files = tuple(_decode_file(f, i, world_size, where) for i, f in enumerate(_list(doc, "files", where)))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise IndexFormatError(f"{where}: duplicate data file names")
    tensors = tuple(_decode_tensor(t, i, files, world_size, where) for i, t in enumerate(_list(doc, "tensors", where)))
    values = tuple(_decode_value_entry(v, i, world_size, where) for i, v in enumerate(_list(doc, "values", where)))
    _check_unique(tensors, values, where)
    _check_file_ranges(tensors, files, where)
    return CheckpointIndex(save_id, world_size, files, tensors, values, version, dict(metadata))


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads``' object_pairs_hook for untrusted JSON: a repeated key is an error, never
    silently the last value (two readers could otherwise see two different documents)."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def _typed(value: object, kind: type[T], where: str, field: str) -> T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise IndexFormatError(f"{where}: field {field} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _int(value: object, where: str, field: str, lo: int = 0, hi: int = MAX_BYTES) -> int:
    n = _typed(value, int, where, field)
    if not lo <= n <= hi:
        raise IndexFormatError(f"{where}: field {field}={n} is outside [{lo}, {hi}]")
    return n


def _list(doc: dict[str, object], field: str, where: str) -> list[object]:
    return _typed(doc.get(field), list, where, field)


def _decode_file(obj: object, i: int, world_size: int, where: str) -> FileEntry:
    f = _typed(obj, dict, where, f"files[{i}]")
    name = _typed(f.get("name"), str, where, f"files[{i}].name")
    if not _FILE_NAME.fullmatch(name) or ".." in name:
        raise IndexFormatError(f"{where}: data file name {name!r} is not a plain name under {DATA_DIR}/")
    rank = _int(f.get("rank"), where, f"files[{i}].rank", hi=world_size - 1)
    return FileEntry(name, rank, _int(f.get("size"), where, f"files[{i}].size"))


def _decode_path(obj: object, where: str, field: str) -> tuple[PathPart, ...]:
    parts = _typed(obj, list, where, field)
    if not parts or len(parts) > MAX_PATH_PARTS:
        raise IndexFormatError(f"{where}: {field} must have 1 to {MAX_PATH_PARTS} parts")
    for i, p in enumerate(parts):
        problem = path_part_problem(p)
        if problem is not None:
            raise IndexFormatError(f"{where}: {field}[{i}] {problem}")
    return tuple(parts)


def _check_key(key: str, path: tuple[PathPart, ...], at: str) -> None:
    if key != "/".join(str(p) for p in path):
        raise IndexFormatError(f"{at}: key does not match its path {list(path)}")


def _optional_rank(obj: object, world_size: int, where: str, field: str) -> int | None:
    return None if obj is None else _int(obj, where, field, hi=world_size - 1)


def _decode_tensor(
    obj: object, i: int, files: tuple[FileEntry, ...], world_size: int, where: str
) -> TensorEntry:
    t = _typed(obj, dict, where, f"tensors[{i}]")
    key = _typed(t.get("key"), str, where, f"tensors[{i}].key")
    at = f"{where}: tensor {key!r}"
    path = _decode_path(t.get("path"), at, "path")
    _check_key(key, path, at)
    dtype = _typed(t.get("dtype"), str, at, "dtype")
    if dtype not in DTYPE_ITEMSIZE:
        raise IndexFormatError(f"{at}: unknown dtype {dtype!r}")
    shape = _dims(t.get("shape"), at, "shape")
    itemsize = DTYPE_ITEMSIZE[dtype]
    # Zero dims count as 1: torch computes the strides of an empty tensor too, and a shape such as
    # [0, 2**48, 2**48] has no elements but strides that overflow int64.
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_BYTES:
        raise IndexFormatError(f"{at}: shape {list(shape)} is too large")
    rank = _optional_rank(t.get("rank"), world_size, at, "rank")
    blocks = tuple(_decode_block(b, j, shape, itemsize, files, at) for j, b in enumerate(_list(t, "blocks", at)))
    _check_volume(shape, blocks, at)
    return TensorEntry(key, path, dtype, shape, rank, blocks)


def _check_volume(shape: tuple[int, ...], blocks: tuple[BlockEntry, ...], at: str) -> None:
    """The blocks hold exactly as many elements as the shape, so a tensor is never larger than its
    stored bytes can decode to. This is O(blocks), with no per-element work; whether the boxes
    overlap is left to ``plan_reads`` (equal totals with an overlap leave a hole, and it reports
    the overlap)."""
    volume = math.prod(shape)
    covered = sum(math.prod(b.sizes) for b in blocks)
    if covered < volume:
        raise IncompleteCheckpointError(
            f"{at} is incomplete: its blocks hold {covered} of the {volume} elements of shape {list(shape)}"
        )
    if covered > volume:
        raise IndexFormatError(
            f"{at} has overlapping blocks: they hold {covered} elements for the {volume} of shape {list(shape)}"
        )


def _dims(obj: object, where: str, field: str) -> tuple[int, ...]:
    dims = _typed(obj, list, where, field)
    if len(dims) > MAX_NDIM:
        raise IndexFormatError(f"{where}: {field} has more than {MAX_NDIM} dimensions")
    return tuple(_int(d, where, field, hi=MAX_DIM) for d in dims)


def _decode_block(
    obj: object, j: int, shape: tuple[int, ...], itemsize: int, files: tuple[FileEntry, ...], at: str
) -> BlockEntry:
    b = _typed(obj, list, at, f"blocks[{j}]")
    if len(b) not in (8, 9):
        raise IndexFormatError(f"{at}: blocks[{j}] must have 8 fields (9 with chunk checksums)")
    offsets = _dims(b[0], at, f"blocks[{j}].offsets")
    sizes = _dims(b[1], at, f"blocks[{j}].sizes")
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise IndexFormatError(f"{at}: blocks[{j}] rank does not match shape {list(shape)}")
    if any(o + s > d for o, s, d in zip(offsets, sizes, shape)):
        raise IndexFormatError(f"{at}: blocks[{j}] box {list(offsets)}+{list(sizes)} leaves shape {list(shape)}")
    file = _int(b[2], at, f"blocks[{j}].file", hi=len(files) - 1) if files else -1
    if file < 0:
        raise IndexFormatError(f"{at}: blocks[{j}] names a file but the index lists none")
    offset = _int(b[3], at, f"blocks[{j}].offset")
    length = _int(b[4], at, f"blocks[{j}].length", hi=MAX_BLOCK_RAW + (1 << 20))
    raw_length = _int(b[5], at, f"blocks[{j}].raw_length", hi=MAX_BLOCK_RAW)
    if raw_length != math.prod(sizes) * itemsize:
        raise IndexFormatError(f"{at}: blocks[{j}] raw_length {raw_length} does not match its box")
    if offset + length > files[file].size:
        raise IndexFormatError(
            f"{at}: blocks[{j}] range [{offset}, {offset + length}) exceeds {files[file].name} "
            f"({files[file].size} bytes)"
        )
    if offset < DATA_HEADER_BYTES:
        raise IndexFormatError(f"{at}: blocks[{j}] offset {offset} lies inside the data file header")
    codec = _typed(b[6], str, at, f"blocks[{j}].codec")
    if codec not in CODECS:
        raise IndexFormatError(f"{at}: blocks[{j}] has unknown codec {codec!r}")
    if codec == "raw" and length != raw_length:
        raise IndexFormatError(f"{at}: raw blocks[{j}] length {length} differs from raw_length {raw_length}")
    if raw_length > max_raw_for_stored(codec, length):
        raise IndexFormatError(
            f"{at}: blocks[{j}] claims {raw_length} raw bytes, more than {length} stored {codec} bytes can decode to"
        )
    checksum = _typed(b[7], str, at, f"blocks[{j}].checksum")
    if not _CHECKSUM.fullmatch(checksum):
        raise IndexFormatError(f"{at}: blocks[{j}] checksum {checksum!r} is not 16 hex digits")
    chunks = _typed(b[8], str, at, f"blocks[{j}].chunks") if len(b) == 9 else ""
    if chunks:
        want = -(-length // RAW_CHUNK_BYTES)
        if codec != "raw" or length <= RAW_CHUNK_BYTES:
            raise IndexFormatError(f"{at}: blocks[{j}] has chunk checksums but is not a raw block over {RAW_CHUNK_BYTES} bytes")
        if len(chunks) != want * CHECKSUM_HEX or not _HEX.fullmatch(chunks):
            raise IndexFormatError(
                f"{at}: blocks[{j}] chunk checksums must be {want} checksums of {CHECKSUM_HEX} hex digits "
                f"(one per {RAW_CHUNK_BYTES} bytes of {length})"
            )
    elif len(b) == 9:
        raise IndexFormatError(f"{at}: blocks[{j}] has an empty chunk checksum field")
    return BlockEntry(offsets, sizes, file, offset, length, raw_length, codec, checksum, chunks)


def _decode_value_entry(obj: object, i: int, world_size: int, where: str) -> ValueEntry:
    v = _typed(obj, dict, where, f"values[{i}]")
    key = _typed(v.get("key"), str, where, f"values[{i}].key")
    at = f"{where}: value {key!r}"
    path = _decode_path(v.get("path"), at, "path")
    _check_key(key, path, at)
    if "value" not in v:
        raise IndexFormatError(f"{at}: missing field value")
    decode_value(v["value"], at, dtypes=False)  # validate now (torch-free); decoded again on load
    return ValueEntry(key, path, v["value"], _optional_rank(v.get("rank"), world_size, at, "rank"))


def _check_unique(tensors: tuple[TensorEntry, ...], values: tuple[ValueEntry, ...], where: str) -> None:
    seen: set[tuple[str, int | None]] = set()
    entries: list[tuple[str, int | None]] = [(t.key, t.rank) for t in tensors] + [(v.key, v.rank) for v in values]
    global_keys = {key for key, rank in entries if rank is None}
    for key, rank in entries:
        if rank is not None and key in global_keys:
            raise IndexFormatError(f"{where}: key {key!r} is stored both per-rank and globally")
        if (key, rank) in seen:
            suffix = "" if rank is None else f" for rank {rank}"
            raise IndexFormatError(f"{where}: duplicate key {key!r}{suffix}")
        seen.add((key, rank))


def _check_file_ranges(tensors: tuple[TensorEntry, ...], files: tuple[FileEntry, ...], where: str) -> None:
    """No two blocks share a stored byte: otherwise one small payload could stand for any number
    of tensors (each checksum-valid), and the declared sizes would bound nothing. O(n log n)."""
    ranges = sorted(
        (b.file, b.offset, b.offset + b.length, t.key, j)
        for t in tensors for j, b in enumerate(t.blocks) if b.length
    )
    for prev, cur in zip(ranges, ranges[1:]):
        if cur[0] == prev[0] and cur[1] < prev[2]:
            raise IndexFormatError(
                f"{where}: tensor {prev[3]!r} blocks[{prev[4]}] and tensor {cur[3]!r} blocks[{cur[4]}] share bytes "
                f"[{cur[1]}, {min(prev[2], cur[2])}) of {files[cur[0]].name}"
            )
