"""Block checksums: xxh3-64 over the stored bytes, hex encoded (fast enough for the hot path,
and checking stored bytes before decompression keeps a corrupt frame away from zstd)."""

from __future__ import annotations

import xxhash


def checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)
