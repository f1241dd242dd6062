"""How many raw bytes a stored block can decode to, at most.

A block's ``raw_length`` is untrusted, like the rest of the index. The codecs bound how far a
stored block can expand, so a raw length beyond that bound is corruption, found without reading or
decoding anything: ``decode_block`` checks it first, and index validation can check it too.
"""

from __future__ import annotations

from shardckpt.errors import CorruptCheckpointError

__all__ = ["ZSTD_MAX_RATIO", "max_raw_for_stored"]

# RFC 8878: no zstd block regenerates more than 128 KiB, and the cheapest block that regenerates
# anything (an RLE block: 3-byte header + 1 byte) costs 4 stored bytes. Frame headers and every
# other block kind cost more, so no frame expands more than 32,768:1.
ZSTD_MAX_RATIO = (128 << 10) // 4


def max_raw_for_stored(codec: str, stored: int) -> int:
    """The most raw bytes that ``stored`` bytes of ``codec`` can decode to.

    A ``planes`` block expands no more than zstd: each of its planes is raw (1:1) or a zstd frame.

    >>> max_raw_for_stored("zstd", 100)
    3276800
    """
    if codec == "raw":
        return stored
    if codec in ("zstd", "planes"):
        return stored * ZSTD_MAX_RATIO
    raise CorruptCheckpointError(f"unknown block codec {codec!r}")
