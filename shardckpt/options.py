"""Frozen option objects. The only module that reads environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass

from shardckpt.errors import StateMismatchError

DEFAULT_BLOCK_BYTES = 4 << 20
_MIN_BLOCK_BYTES = 4 << 10
CODEC_CHOICES = ("auto", "zstd", "none")


@dataclass(frozen=True)
class CompressionOptions:
    """How blocks are encoded.

    ``codec`` is ``"auto"`` (``save``'s default, given as the string ``"auto"``: each block is
    compressed or stored raw, whichever keeps the save fastest given the measured encoder and
    storage throughput; see ``shardckpt.pipeline.adaptive``), ``"zstd"`` (always compress;
    float-aware: floats are split into byte planes and only the planes that shrink are compressed)
    or ``"none"`` (never). Options built without a codec compress every block, so that tuning the
    level or the block size keeps the stored bytes reproducible; pass ``codec="auto"`` for the
    adaptive policy. ``level`` is the zstd level; 1 keeps up with fast disks.
    ``block_bytes`` is the raw size of an independently decodable block: the unit of partial reads,
    checksums and parallel work.
    """

    codec: str = "zstd"
    level: int = 1
    block_bytes: int = DEFAULT_BLOCK_BYTES

    def __post_init__(self) -> None:
        if self.codec not in CODEC_CHOICES:
            raise StateMismatchError(f"compression codec must be 'auto', 'zstd' or 'none', not {self.codec!r}")
        if not -7 <= self.level <= 22:
            raise StateMismatchError(f"zstd level must be in [-7, 22], not {self.level}")
        if self.block_bytes < _MIN_BLOCK_BYTES:
            raise StateMismatchError(f"block_bytes must be at least {_MIN_BLOCK_BYTES}, not {self.block_bytes}")


Compression = str | CompressionOptions | None


def compression_options(compression: Compression) -> CompressionOptions:
    """Normalise the user's ``compression=`` argument ("auto", "zstd", "none", None or options)."""
    if isinstance(compression, CompressionOptions):
        return compression
    if compression is None or compression == "none":
        return CompressionOptions(codec="none", block_bytes=_env_block_bytes())
    if compression in ("auto", "zstd"):
        return CompressionOptions(codec=compression, block_bytes=_env_block_bytes())
    raise StateMismatchError(
        f"compression must be 'auto', 'zstd', 'none' or CompressionOptions, not {compression!r}"
    )


def _env_block_bytes() -> int:
    raw = os.environ.get("SHARDCKPT_BLOCK_BYTES")
    return int(raw) if raw else DEFAULT_BLOCK_BYTES


def rank_cores() -> float:
    """CPU cores this rank may use: the cores in its affinity mask (a container's or a launcher's
    CPU set, not the whole host's), shared evenly among the ranks of this node (``LOCAL_WORLD_SIZE``,
    set by torchrun). Fractional when ranks outnumber cores: it is a rate, not a thread count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        cores = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    ranks = int(local) if local.strip().isdigit() and int(local) > 0 else 1
    return max(cores, 1) / ranks


def io_threads() -> int:
    """Worker threads per rank for encoding, writing, reading and decoding: one per core this rank
    may use (``rank_cores``), at least 2 so that one thread's write overlaps another's encode, at
    most 32. ``SHARDCKPT_IO_THREADS`` overrides it."""
    raw = os.environ.get("SHARDCKPT_IO_THREADS")
    if raw:
        return max(1, int(raw))
    return max(2, min(32, int(rank_cores())))


def background_nice() -> int:
    """The nice value of the threads that encode and write an ``async_save`` in the background:
    19, the lowest priority, unless ``SHARDCKPT_BACKGROUND_NICE`` (0-19) says otherwise.
    The training loop does not wait for those threads, so they should run on the CPU it leaves
    idle rather than take cores from it (measured: docs/benchmarks.md, "Background threads at the
    lowest priority"). 0 runs them as the training runs."""
    raw = os.environ.get("SHARDCKPT_BACKGROUND_NICE", "").strip()
    if not raw:
        return 19
    if not raw.isdigit() or int(raw) > 19:
        raise StateMismatchError(f"SHARDCKPT_BACKGROUND_NICE must be a whole number from 0 to 19, not {raw!r}")
    return int(raw)


def read_round_bytes() -> int:
    """Decoded bytes of shared blocks per exchange round of ``load(read_once=True)``: each rank
    holds at most about this much (times the ranks it sends to) in its send and receive buffers."""
    raw = os.environ.get("SHARDCKPT_READ_ROUND_BYTES")
    return max(1, int(raw)) if raw else 256 << 20


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
