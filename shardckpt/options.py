"""Frozen option objects. The only module that reads environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass

from shardckpt.errors import StateMismatchError

DEFAULT_BLOCK_BYTES = 4 << 20
_MIN_BLOCK_BYTES = 4 << 10


@dataclass(frozen=True)
class CompressionOptions:
    """How blocks are encoded.

    ``codec`` is ``"zstd"`` (float-aware: floats are split into byte planes and only the planes
    that shrink are compressed) or ``"none"``. ``level`` is the zstd level; 1 keeps up with fast disks.
    ``block_bytes`` is the raw size of an independently decodable block: the unit of partial reads,
    checksums and parallel work.
    """

    codec: str = "zstd"
    level: int = 1
    block_bytes: int = DEFAULT_BLOCK_BYTES

    def __post_init__(self) -> None:
        if self.codec not in ("zstd", "none"):
            raise StateMismatchError(f"compression codec must be 'zstd' or 'none', not {self.codec!r}")
        if not -7 <= self.level <= 22:
            raise StateMismatchError(f"zstd level must be in [-7, 22], not {self.level}")
        if self.block_bytes < _MIN_BLOCK_BYTES:
            raise StateMismatchError(f"block_bytes must be at least {_MIN_BLOCK_BYTES}, not {self.block_bytes}")


Compression = str | CompressionOptions | None


def compression_options(compression: Compression) -> CompressionOptions:
    """Normalise the user's ``compression=`` argument ("zstd", "none", None or options)."""
    if isinstance(compression, CompressionOptions):
        return compression
    if compression is None or compression == "none":
        return CompressionOptions(codec="none", block_bytes=_env_block_bytes())
    if compression == "zstd":
        return CompressionOptions(codec="zstd", block_bytes=_env_block_bytes())
    raise StateMismatchError(f"compression must be 'zstd', 'none' or CompressionOptions, not {compression!r}")


def _env_block_bytes() -> int:
    raw = os.environ.get("SHARDCKPT_BLOCK_BYTES")
    return int(raw) if raw else DEFAULT_BLOCK_BYTES


def io_threads() -> int:
    """Worker threads per rank for encoding, writing, reading and decoding."""
    raw = os.environ.get("SHARDCKPT_IO_THREADS")
    if raw:
        return max(1, int(raw))
    return max(2, min(8, os.cpu_count() or 2))


def staging_budget() -> int | None:
    """Host bytes async saves may keep for snapshots (None: as much as a save needs)."""
    raw = os.environ.get("SHARDCKPT_STAGING_BYTES")
    return int(raw) if raw else None


def collective_timeout_seconds() -> float:
    """How long a background collective (the async side group's gathers) waits for a silent peer.
    A dead peer is usually noticed at once (its connections close); this bounds the rest."""
    raw = os.environ.get("SHARDCKPT_TIMEOUT_S")
    return float(raw) if raw else 1800.0


def restarts_share_the_store() -> bool:
    """True when torchrun may restart this worker and shares its rendezvous store with it (torch's
    default; ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment turns it off)."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return shared and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0


def fault_spec() -> tuple[str, str]:
    """The fault to inject (tests only; ``shardckpt.storage.faults``) and this process's rank."""
    return os.environ.get("SHARDCKPT_FAULT", ""), os.environ.get("RANK", "0")
