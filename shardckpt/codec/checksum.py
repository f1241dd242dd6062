"""Block checksums: xxh3-64 over the stored bytes, hex encoded (fast enough for the hot path,
and checking stored bytes before decompression keeps a corrupt frame away from zstd)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from typing_extensions import Buffer


def checksum(data: Buffer) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def chunk_checksums(data: Buffer, chunk: int) -> str:
    """The checksums of ``data``'s ``chunk``-byte pieces (the last one may be shorter), concatenated."""
    view = memoryview(data).cast("B")
    return "".join(xxhash.xxh3_64_hexdigest(view[i : i + chunk]) for i in range(0, len(view), chunk))
