"""Block checksums: xxh3-64 over the stored bytes, hex encoded (fast enough for the hot path,
and checking stored bytes before decompression keeps a corrupt frame away from zstd)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from typing_extensions import Buffer


def checksum(data: Buffer) -> str:
    return xxhash.xxh3_64_hexdigest(data)
