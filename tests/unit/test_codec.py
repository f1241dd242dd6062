"""Block codecs: bit-exact round trips for every dtype the format names, and hostile payloads that
must fail with ``CorruptCheckpointError`` without allocating more than the caller's out buffer."""

from __future__ import annotations

import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard

from shardckpt import CorruptCheckpointError
from shardckpt.codec import CODECS, decode_block, encode_block, max_raw_for_stored
from shardckpt.format.schema import DTYPES

pytestmark = pytest.mark.timeout(60)

LEVEL = 1


def _values(dtype: torch.dtype, n: int, kind: str, seed: int = 0) -> torch.Tensor:
    """``n`` elements of ``dtype``: "random", "constant" or "zeros"."""
    g = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        return torch.zeros(n, dtype=dtype)
    if dtype == torch.bool:
        t = torch.randint(0, 2, (n,), generator=g).bool()
    elif dtype.is_floating_point:
        t = (torch.randn(n, generator=g) * 3).to(dtype)
    elif dtype.is_complex:
        t = torch.randn(n, generator=g, dtype=dtype)
    else:  # every integer dtype, unsigned ones included: random bytes viewed as the dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        t = torch.randint(0, 256, (n * itemsize,), generator=g, dtype=torch.uint8).view(dtype)
    if kind == "constant":
        t = t[:1].expand(n).contiguous()
    return t


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _round_trip(raw: np.ndarray, dtype_name: str, itemsize: int, codec: str) -> tuple[str, bytes]:
    name, payload = encode_block(raw, dtype_name, itemsize, codec, LEVEL)
    stored = bytes(payload)  # what a file read hands back: no aliasing of ``raw``
    assert name in CODECS
    assert raw.nbytes <= max_raw_for_stored(name, len(stored))
    if name != "planes":  # planes has its own test below (test_planes_never_larger_than_raw)
        assert len(stored) <= raw.nbytes, "an encoded block must never be larger than the raw bytes"
    if name == "raw":
        assert stored == raw.tobytes()
    out = np.full(raw.nbytes, 0xA5, dtype=np.uint8)
    decode_block(name, stored, out, itemsize)
    assert np.array_equal(out, raw), f"{dtype_name} via {name} is not bit-exact"
    return name, stored


@pytest.mark.parametrize("codec", ["none", "zstd"])
@pytest.mark.parametrize("kind", ["random", "constant", "zeros"])
@pytest.mark.parametrize("n", [1, 63, 64, 5000])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_round_trip_every_dtype(dtype_name, n, kind, codec):
    dtype = DTYPES[dtype_name]
    t = _values(dtype, n, kind)
    raw = _raw(t)
    name, stored = _round_trip(raw, dtype_name, t.element_size(), codec)
    if codec == "none":
        assert name == "raw"
    # Decoded bytes reinterpret as the same values (bit-exact, so NaN payloads survive too).
    out = np.empty(raw.nbytes, dtype=np.uint8)
    decode_block(name, stored, out, t.element_size())
    back = torch.from_numpy(out).view(dtype)
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_constant_data_compresses(dtype_name):
    t = _values(DTYPES[dtype_name], 32 << 10, "zeros")
    raw = _raw(t)
    name, stored = _round_trip(raw, dtype_name, t.element_size(), "zstd")
    assert name != "raw"
    assert len(stored) < raw.nbytes // 20


def test_empty_block_is_raw():
    raw = np.empty(0, dtype=np.uint8)
    name, payload = encode_block(raw, "float32", 4, "zstd", LEVEL)
    assert name == "raw" and len(payload) == 0
    decode_block("raw", b"", np.empty(0, dtype=np.uint8), 4)


@pytest.mark.parametrize(
    ("dtype_name", "kind"),
    [("bfloat16", "random"), ("float32", "random"), ("int64", "random"), ("uint8", "random"),
     ("float16", "zeros"), ("float64", "constant")],
)
def test_multi_megabyte_blocks(dtype_name, kind):
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    t = _values(dtype, (4 << 20) // itemsize, kind, seed=3)
    for codec in ("none", "zstd"):
        _round_trip(_raw(t), dtype_name, itemsize, codec)


def test_bf16_weights_use_byte_planes_and_shrink():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(1 << 20, generator=g) * 0.02).to(torch.bfloat16)
    raw = _raw(w)
    name, stored = _round_trip(raw, "bfloat16", 2, "zstd")
    assert name == "planes"
    assert len(stored) < 0.9 * raw.nbytes
    # The exponent plane is the one that shrinks: byte 1 (high byte, little-endian) is compressed.
    itemsize, flag_lo, flag_hi = struct.unpack_from("<BBB", stored)
    assert (itemsize, flag_lo, flag_hi) == (2, 0, 1)


@pytest.mark.parametrize(("dtype_name", "n"), [("bfloat16", 64), ("float32", 64)])
def test_planes_never_larger_than_raw(dtype_name, n):
    # Small random float blocks: one plane shrinks a little, the plane header costs more than that.
    t = _values(DTYPES[dtype_name], n, "random")
    raw = _raw(t)
    name, payload = encode_block(raw, dtype_name, t.element_size(), "zstd", LEVEL)
    assert len(payload) <= raw.nbytes, f"{name} block of {len(payload)} bytes for {raw.nbytes} raw bytes"


def test_incompressible_bytes_stay_raw():
    raw = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    name, stored = _round_trip(raw, "uint8", 1, "zstd")
    assert name == "raw"


# --- hostile payloads ---------------------------------------------------------------------------

OUT_BYTES = 1 << 20
SLACK = 256 << 10  # exception objects, tracebacks, small headers


def _decode_bounded(codec: str, payload: bytes, nbytes: int = OUT_BYTES, itemsize: int = 2) -> CorruptCheckpointError:
    """Decode a hostile payload; it must raise CorruptCheckpointError and allocate no more than the
    out buffer (plus small change) while doing so."""
    out = np.empty(nbytes, dtype=np.uint8)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError) as info:
            decode_block(codec, payload, out, itemsize)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= nbytes + SLACK, f"decoding a hostile {codec} block peaked at {peak} bytes"
    return info.value


def _weights(n: int = OUT_BYTES // 2) -> np.ndarray:
    g = torch.Generator().manual_seed(2)
    return _raw((torch.randn(n, generator=g) * 0.02).to(torch.bfloat16))


@pytest.fixture(scope="module")
def planes_block() -> bytes:
    name, payload = encode_block(_weights(), "bfloat16", 2, "zstd", LEVEL)
    assert name == "planes"
    return bytes(payload)


@pytest.fixture(scope="module")
def zstd_block() -> bytes:
    raw = np.tile(np.arange(200, dtype=np.uint8), OUT_BYTES // 200 + 1)[:OUT_BYTES]
    name, payload = encode_block(raw, "uint8", 1, "zstd", LEVEL)
    assert name == "zstd"
    return bytes(payload)


def _header(itemsize: int, flags: list[int], lengths: list[int]) -> bytes:
    return struct.pack(f"<B{itemsize}B{itemsize}Q", itemsize, *flags, *lengths)


def test_raw_wrong_length():
    _decode_bounded("raw", b"\0" * (OUT_BYTES - 1))
    _decode_bounded("raw", b"\0" * (OUT_BYTES + 1))
    _decode_bounded("raw", b"")


def test_zstd_truncated_at_every_point():
    raw = np.tile(np.arange(50, dtype=np.uint8), 100)
    name, payload = encode_block(raw, "uint8", 1, "zstd", LEVEL)
    assert name == "zstd"
    payload = bytes(payload)
    for cut in range(len(payload)):
        _decode_bounded("zstd", payload[:cut], nbytes=raw.nbytes)


def test_zstd_truncated_large(zstd_block):
    for cut in (0, 3, 4, 10, len(zstd_block) // 2, len(zstd_block) - 1):
        _decode_bounded("zstd", zstd_block[:cut], itemsize=1)


def test_zstd_trailing_bytes_rejected(zstd_block):
    _decode_bounded("zstd", zstd_block + b"trailing garbage", itemsize=1)
    # Even what a zstd reader would skip: an empty frame, a skippable frame.
    _decode_bounded("zstd", zstd_block + zstandard.ZstdCompressor().compress(b""), itemsize=1)
    _decode_bounded("zstd", zstd_block + struct.pack("<II", 0x184D2A50, 3) + b"abc", itemsize=1)


def test_zstd_frame_declaring_nothing():
    empty = zstandard.ZstdCompressor().compress(b"")
    decode_block("zstd", empty, np.empty(0, dtype=np.uint8), 1)
    for hostile in (empty + b"trailing", empty[:-1], _rle_frame(0, 512)):
        _decode_bounded("zstd", hostile, nbytes=0, itemsize=1)


def test_zstd_frame_declaring_huge_size():
    # A frame header that declares 1 TiB of content, followed by one small raw block (incompressible
    # bytes, so that the frame is long enough to pass the expansion bound and reach the header check).
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=1 << 40)
    frame = cobj.compress(bytes(range(100))) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert zstandard.frame_content_size(frame) == 1 << 40
    err = _decode_bounded("zstd", frame, itemsize=1)
    assert "declares" in str(err)
    # Hand-built single-segment frame: magic, descriptor (8-byte content size), size, last raw block.
    crafted = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", (1 << 62) + 5) + b"\x01\x00\x00"
    _decode_bounded("zstd", crafted, itemsize=1)


def test_zstd_frame_without_content_size():
    data = bytes(range(256)) * (OUT_BYTES // 256)
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(data)
    _decode_bounded("zstd", frame, itemsize=1)


def test_zstd_frame_of_the_wrong_size():
    small = zstandard.ZstdCompressor(level=1).compress(b"\0" * (OUT_BYTES // 2))
    _decode_bounded("zstd", small, itemsize=1)


def test_not_a_zstd_frame():
    _decode_bounded("zstd", b"definitely not zstd" * 10, itemsize=1)


def test_planes_truncated(planes_block):
    cuts = [0, 1, 2, 5, 18, 19, 20, 100, len(planes_block) // 2, len(planes_block) - 1]
    for cut in cuts:
        _decode_bounded("planes", planes_block[:cut])


def test_planes_wrong_header_itemsize(planes_block):
    # The payload says itemsize 2; the index says the tensor has 4-byte elements.
    _decode_bounded("planes", planes_block, itemsize=4)
    # The payload's itemsize byte is changed.
    for bad in (0, 1, 4, 255):
        _decode_bounded("planes", bytes([bad]) + planes_block[1:])


def test_planes_lengths_do_not_add_up(planes_block):
    flags = list(planes_block[1:3])
    lengths = list(struct.unpack_from("<2Q", planes_block, 3))
    body = planes_block[19:]
    assert sum(lengths) == len(body)
    for bad in ([lengths[0] + 1, lengths[1]], [lengths[0], lengths[1] - 1], [2**64 - 1, lengths[1]],
                [2**63, 2**63], [0, 0]):
        _decode_bounded("planes", _header(2, flags, bad) + body)
    # Lengths that add up but are split at the wrong point.
    _decode_bounded("planes", _header(2, flags, [lengths[0] - 7, lengths[1] + 7]) + body)


def test_planes_bad_flags(planes_block):
    body = planes_block[3:]
    for flags in ([2, 1], [1, 1], [0, 0], [0, 255]):
        _decode_bounded("planes", bytes([2, *flags]) + body)


def test_planes_compressed_plane_declaring_huge_size():
    n = OUT_BYTES // 2
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=1 << 40)
    hostile = cobj.compress(b"\0" * 64) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    raw_plane = b"\0" * n
    payload = _header(2, [0, 1], [n, len(hostile)]) + raw_plane + hostile
    _decode_bounded("planes", payload)


def _rle_frame(declared: int, blocks: int) -> bytes:
    """A zstd frame built by hand: its header declares ``declared`` content bytes and a 128 KiB
    window, and each of its ``blocks`` RLE blocks regenerates 128 KiB of zeros from 4 stored bytes
    (zstd's densest encoding, ~32,000:1). A window smaller than the declared size makes libzstd's
    streaming decoder reuse its buffer, so only the caller can stop it at the declared size."""
    header = zstandard.FRAME_HEADER + bytes([0x80, 0x38]) + struct.pack("<I", declared)
    rle = [struct.pack("<I", (zstandard.BLOCKSIZE_MAX << 3) | 0b010 | last)[:3] + b"\0" for last in (0, 1)]
    return header + rle[0] * (blocks - 1) + rle[1]


def test_rle_frame_is_a_valid_frame():
    # The bomb below is hostile only in its declared size: declared honestly, it decodes.
    out = np.full(OUT_BYTES, 0xA5, dtype=np.uint8)
    decode_block("zstd", _rle_frame(OUT_BYTES, OUT_BYTES // zstandard.BLOCKSIZE_MAX), out, 1)
    assert not out.any()


def test_zstd_bomb_stops_at_the_declared_size():
    # 2 KiB that declare 1 MiB and hold 64 MiB: decoding must stop at 1 MiB, not inflate it all.
    bomb = _rle_frame(OUT_BYTES, 512)
    assert len(bomb) < 4096
    _decode_bounded("zstd", bomb, itemsize=1)


def test_planes_bomb_stops_at_the_declared_size():
    n = OUT_BYTES // 2
    bomb = _rle_frame(n, 512)
    _decode_bounded("planes", _header(2, [0, 1], [n, len(bomb)]) + b"\0" * n + bomb)


def test_max_raw_for_stored_holds_for_the_densest_frames():
    for blocks in (1, 8, 512):
        frame = _rle_frame(blocks * zstandard.BLOCKSIZE_MAX, blocks)
        assert blocks * zstandard.BLOCKSIZE_MAX <= max_raw_for_stored("zstd", len(frame))
    zeros = 16 << 20
    for level in (1, 19):
        frame = zstandard.ZstdCompressor(level=level).compress(bytes(zeros))
        assert zeros <= max_raw_for_stored("zstd", len(frame)) < 1.1 * zeros  # and the bound is nearly tight
    assert max_raw_for_stored("raw", 123) == 123
    with pytest.raises(CorruptCheckpointError, match="'lz4'"):
        max_raw_for_stored("lz4", 123)


def test_raw_length_beyond_what_the_block_can_hold():
    # Rejected before any decoding: 16 stored bytes cannot expand to 1 MiB in any codec.
    for codec in CODECS:
        err = _decode_bounded(codec, b"\0" * 16)
        assert "cannot decode to" in str(err)


_RSS_PROBE = r"""
import re, sys
import numpy as np
from shardckpt.codec import decode_block
from shardckpt.errors import CorruptCheckpointError

def rss_kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

bomb = sys.stdin.buffer.read()
out = np.ones(int(sys.argv[1]), dtype=np.uint8)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
before = rss_kib("VmRSS")
try:
    decode_block("zstd", bomb, out, 1)
except CorruptCheckpointError:
    print(rss_kib("VmHWM") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_zstd_bomb_peak_memory_in_a_fresh_process():
    # tracemalloc sees only Python's allocator; the peak resident size also counts libzstd's own
    # buffers. A fresh process, so that nothing else on this one's heap blurs the number.
    probe = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(OUT_BYTES)], input=_rle_frame(OUT_BYTES, 512),
                           capture_output=True, timeout=50)
    assert probe.returncode == 0, probe.stderr.decode()
    assert probe.stdout.strip(), "the bomb decoded without an error"
    grown_kib = int(probe.stdout)
    assert grown_kib * 1024 < 16 * OUT_BYTES, f"decoding the bomb grew the peak RSS by {grown_kib} KiB"


@pytest.mark.parametrize("codec", ["lz4", "", "RAW", "zstd ", "planes\0", "none"])
def test_unknown_codec_name(codec):
    err = _decode_bounded(codec, b"\0" * OUT_BYTES)
    assert repr(codec) in str(err)
