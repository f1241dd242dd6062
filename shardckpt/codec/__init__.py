"""Block codecs: raw, zstd, and the float-aware byte-plane codec. See docs/format.md, "Codecs"."""

from shardckpt.codec.blocks import CODECS, decode_block, encode_block

__all__ = ["CODECS", "decode_block", "encode_block"]
