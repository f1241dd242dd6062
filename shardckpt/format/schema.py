"""Frozen dataclasses that mirror the index JSON one to one (docs/format.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
DATA_DIR = "data"
# Every data file starts with this header: magic, format version, rank, save id (ASCII, padded).
DATA_MAGIC = b"SHCKDAT1"
DATA_HEADER_BYTES = 64
# Block codecs a reader must know (docs/format.md, "Codecs").
CODECS = ("raw", "zstd", "planes")
# A raw block larger than this also records a checksum of each such piece of it (BlockEntry.chunks),
# so a load that needs part of the block reads and verifies only the pieces it overlaps.
RAW_CHUNK_BYTES = 1 << 20
CHECKSUM_HEX = 16

PathPart = str | int
JsonValue = object

MAX_PATH_PARTS = 256
# Every int a checkpoint holds (values, metadata, int path parts) fits a signed or an unsigned
# 64-bit integer: what a reader in another language can hold without a bignum library.
MIN_INT = -(1 << 63)
MAX_INT = (1 << 64) - 1
# Control characters (C0, DEL, C1) and lone surrogates. A key is printed by ``inspect`` and in
# every error, and must encode as UTF-8; "\0" also separates a key from its rank in the saver's
# per-rank item names, so a key holding it could alias another entry.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def int_problem(n: int) -> str | None:
    """Why ``n`` cannot be stored (outside [MIN_INT, MAX_INT]), or None. Describes the int by its
    size, never its digits: formatting an int of more than 4300 digits raises ValueError."""
    if MIN_INT <= n <= MAX_INT:
        return None
    return f"is an int {'below -2**63' if n < 0 else 'above 2**64 - 1'} ({n.bit_length()} bits)"


def path_part_problem(part: object) -> str | None:
    """Why ``part`` cannot be a step of a saved path (docs/format.md, section 5), or None.

    >>> path_part_problem(2**64)
    'is an int above 2**64 - 1 (65 bits)'
    """
    if isinstance(part, bool) or not isinstance(part, str | int):
        return f"must be a str or int, not {type(part).__name__}"
    if isinstance(part, int):
        return int_problem(part)
    if _UNPRINTABLE.search(part):
        return "contains a control character or a lone surrogate"
    return None

# The only dtypes a checkpoint may name, with their sizes in bytes. Looking names up here (never
# getattr on torch) keeps a hostile index from reaching arbitrary attributes. Plain ints, so that
# reading and validating an index (``shardckpt ls``/``inspect``) never imports torch.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex64": 8,
    "complex128": 16,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

if TYPE_CHECKING:
    # Built on first use by ``__getattr__`` below: name -> torch.dtype, and back.
    DTYPES: dict[str, torch.dtype]
    DTYPE_NAMES: dict[torch.dtype, str]

_torch_tables: tuple[dict[str, torch.dtype], dict[torch.dtype, str]] | None = None


def _tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    global _torch_tables
    if _torch_tables is None:
        import torch

        by_name = {name: getattr(torch, name) for name in DTYPE_ITEMSIZE}  # fixed names, not the index's
        _torch_tables = (by_name, {dtype: name for name, dtype in by_name.items()})
    return _torch_tables


def __getattr__(name: str) -> object:
    # PEP 562: DTYPES and DTYPE_NAMES hold torch.dtype objects, so torch is imported the first
    # time one is used rather than when the format module is.
    if name == "DTYPES":
        return _tables()[0]
    if name == "DTYPE_NAMES":
        return _tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype) -> str | None:
    """The checkpoint's name for ``dtype`` (``"bfloat16"``), or None for one it cannot hold."""
    return _tables()[1].get(dtype)


def torch_dtype_of(name: str) -> torch.dtype:
    """The torch.dtype a checkpoint names ``name``; KeyError for a name not in DTYPE_ITEMSIZE."""
    return _tables()[0][name]


@dataclass(frozen=True)
class BlockEntry:
    """One independently decodable piece of a tensor: a box of the global tensor, stored at
    ``[offset, offset + length)`` of data file number ``file``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: int
    offset: int
    length: int
    raw_length: int
    codec: str
    checksum: str
    # Raw blocks over RAW_CHUNK_BYTES: the checksums of its RAW_CHUNK_BYTES pieces, concatenated
    # (CHECKSUM_HEX digits each); "" for other blocks. Re-sharded loads read only what they need.
    chunks: str = ""

    def chunk_checksum(self, i: int) -> str:
        return self.chunks[i * CHECKSUM_HEX : (i + 1) * CHECKSUM_HEX]


@dataclass(frozen=True)
class TensorEntry:
    """A tensor's global description and the blocks that hold it. ``rank`` is set for per-rank
    tensors (one entry per saving rank) and None for global ones."""

    key: str
    path: tuple[PathPart, ...]
    dtype: str
    shape: tuple[int, ...]
    rank: int | None = None
    blocks: tuple[BlockEntry, ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype_of(self.dtype)

    @property
    def itemsize(self) -> int:
        """Bytes per element, without importing torch."""
        return DTYPE_ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class ValueEntry:
    """A JSON-like value (int, float, str, bool, None, containers of them), stored inline."""

    key: str
    path: tuple[PathPart, ...]
    value: JsonValue
    rank: int | None = None


@dataclass(frozen=True)
class FileEntry:
    name: str
    rank: int
    size: int


@dataclass(frozen=True)
class CheckpointIndex:
    """The global index: what makes a checkpoint exist."""

    save_id: str
    world_size: int
    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...]
    values: tuple[ValueEntry, ...]
    version: int = FORMAT_VERSION
    metadata: dict[str, JsonValue] = field(default_factory=dict)

    def bytes_raw(self) -> int:
        return sum(b.raw_length for t in self.tensors for b in t.blocks)

    def bytes_stored(self) -> int:
        return sum(b.length for t in self.tensors for b in t.blocks)
