"""Block codecs: raw, zstd, and the float-aware byte-plane codec. See docs/format.md, "Codecs"."""

from shardckpt.codec.blocks import CODECS, decode_block, encode_block
from shardckpt.codec.limits import ZSTD_MAX_RATIO, max_raw_for_stored

__all__ = ["CODECS", "ZSTD_MAX_RATIO", "decode_block", "encode_block", "max_raw_for_stored"]
