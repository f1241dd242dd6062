"""Data file names and headers. The header ties a file to its save and rank, so swapped or stale
files are reported as such instead of as a pile of checksum failures."""

from __future__ import annotations

import struct

from shardckpt.errors import CorruptCheckpointError
from shardckpt.format.schema import DATA_DIR, DATA_HEADER_BYTES, DATA_MAGIC, FORMAT_VERSION

_HEADER = struct.Struct("<8sII48s")


def data_file_name(save_id: str, rank: int) -> str:
    return f"{DATA_DIR}/{save_id}-r{rank:05d}.bin"


def encode_header(save_id: str, rank: int) -> bytes:
    out = _HEADER.pack(DATA_MAGIC, FORMAT_VERSION, rank, save_id.encode().ljust(48, b"\0"))
    assert len(out) == DATA_HEADER_BYTES
    return out


def check_header(data: bytes, save_id: str, rank: int, where: str) -> None:
    if len(data) != DATA_HEADER_BYTES:
        raise CorruptCheckpointError(f"{where}: data file header is truncated")
    magic, version, file_rank, raw_id = _HEADER.unpack(data)
    if magic != DATA_MAGIC or version != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{where}: not a shardckpt data file (bad magic or version)")
    file_id = raw_id.rstrip(b"\0").decode("ascii", "replace")
    if file_id != save_id or file_rank != rank:
        raise CorruptCheckpointError(
            f"{where}: data file belongs to save {file_id!r} rank {file_rank}, but the index expects save "
            f"{save_id!r} rank {rank} (swapped or stale file?)"
        )
