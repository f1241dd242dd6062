"""Digests of replicated tensors, to catch replicas that differ before one of them is saved for all.

Every holder of a replica digests its copy inside the snapshot, since the training loop may change
the tensor right after. A host tensor is hashed where it lies (xxh3 over its bytes, no copy). A
device tensor is digested on the device: copying a whole DDP model to the host while the training
loop waits cost more than the snapshot itself.

The device digest is two position-weighted sums of the tensor's 32-bit words, modulo 2**64, with
odd weights drawn from the word's index. Integer sums are exact in any order, so the digest does
not depend on how the device reduces. Any single differing word changes both sums (an odd weight
times a nonzero difference below 2**32 is never 0 modulo 2**64); unrelated differences collide
with a chance of about 2**-64 per sum. It is a check against replicas that drifted apart, not
against an adversary: a hostile peer is outside what a training job defends against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from shardckpt.codec.checksum import checksum

if TYPE_CHECKING:
    from typing_extensions import Buffer

# Words per step of the device digest: bounds its temporaries (a few int64 tensors of this length)
# and keeps each step's sums exact in int64 (fewer than 2**31 terms below 2**32 each).
_CHUNK_WORDS = 8 << 20
# Two sums; the weight of word i is ((i mod 2**31) * A + B) mod 2**31, made odd. A, B < 2**31, so
# no product overflows int64: signed overflow is undefined in the kernels, not a wrap-around.
_WEIGHTS = ((0x1E3779B1, 0x7F4A7C15), (0x05EBCA77, 0x42B2AE3D))
_MASK31, _MASK32, _MASK64 = (1 << 31) - 1, (1 << 32) - 1, (1 << 64) - 1


def replica_digest(tensor: torch.Tensor) -> str:
    """A digest of ``tensor``'s dtype, shape and bytes; equal tensors on the same kind of device
    give equal digests. Host tensors: ``xxh3:...``; device tensors: ``dev:...``."""
    t = tensor.detach()
    if t.device.type == "cpu":
        return HostDigest(t.contiguous())()
    return f"dev:{_head(t)}:{device_digest(t)}"


def _head(t: torch.Tensor) -> str:
    return f"{t.dtype}{list(t.shape)}"


class HostDigest:
    """``replica_digest`` of one contiguous host tensor, whose header and byte view are made once
    and read again by each call: for a tensor of a few bytes (an optimizer's step count), making
    them was nearly all of the digest's cost. The view shares the tensor's memory, so each call
    hashes its current bytes."""

    __slots__ = ("_data", "_head")

    def __init__(self, tensor: torch.Tensor) -> None:
        t = tensor.detach()
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("HostDigest needs a contiguous host tensor (a copy would not follow it)")
        self._head = _head(t)
        # cast: numpy's stubs give ndarray ``__buffer__`` only for Python >= 3.12 (see codec/blocks.py).
        self._data = cast("Buffer", t.reshape(-1).view(torch.uint8).numpy())

    def __call__(self) -> str:
        return f"xxh3:{self._head}:{checksum(self._data)}"


def device_digest(tensor: torch.Tensor) -> str:
    """The position-weighted word sums of ``tensor``'s bytes modulo 2**64, computed where the
    tensor lives (any device; the host too, which is how it is tested without a GPU)."""
    raw = tensor.contiguous().reshape(-1).view(torch.uint8)
    whole = raw.numel() // 4 * 4
    words = raw[:whole].view(torch.int32)
    tail = raw[whole:].to(torch.int32)  # the last 1-3 bytes, each its own word
    parts: list[torch.Tensor] = []
    for start in range(0, words.numel(), _CHUNK_WORDS):
        parts.append(_partial_sums(words[start : start + _CHUNK_WORDS], start))
    if tail.numel():
        parts.append(_partial_sums(tail, words.numel()))
    if not parts:
        return "0" * 32
    # One transfer of a few int64 values per chunk: the only host copy. Python ints are exact.
    rows = torch.stack(parts).cpu().tolist()
    out = ""
    for k in range(len(_WEIGHTS)):
        total = sum((hi << 32) + lo for lo, hi in (row[2 * k : 2 * k + 2] for row in rows))
        out += f"{total & _MASK64:016x}"
    return out


def _partial_sums(words: torch.Tensor, start: int) -> torch.Tensor:
    """[low 32 bits summed, high bits summed] of each weighted sum over ``words``: each sum of
    fewer than 2**31 terms below 2**32 fits in int64 exactly."""
    index = torch.arange(start, start + words.numel(), dtype=torch.int64, device=words.device) & _MASK31
    values = words.to(torch.int64) & _MASK32  # the word as an unsigned 32-bit value
    sums = []
    for a, b in _WEIGHTS:
        products = values * (((index * a + b) & _MASK31) | 1)  # below 2**63
        sums += [(products & _MASK32).sum(), (products >> 32).sum()]
    return torch.stack(sums)
