"""Block codecs: raw, zstd, and the float-aware byte-plane codec. See docs/format.md, "Codecs"."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from shardckpt.codec.limits import ZSTD_MAX_RATIO, max_raw_for_stored

if TYPE_CHECKING:
    from shardckpt.codec.blocks import CODECS, decode_block, encode_block

__all__ = ["CODECS", "ZSTD_MAX_RATIO", "decode_block", "encode_block", "max_raw_for_stored"]


def __getattr__(name: str) -> object:
    # The codecs import numpy and zstandard (0.1 s): imported when a block is first encoded or
    # decoded, not when the index is validated (format/index_json needs only ``limits``), so that
    # ``shardckpt ls``/``inspect`` start fast.
    if name in ("CODECS", "decode_block", "encode_block"):
        return getattr(importlib.import_module("shardckpt.codec.blocks"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
