"""N-dimensional boxes (offsets + sizes in global coordinates) and their overlaps."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @staticmethod
    def full(shape: tuple[int, ...]) -> Box:
        return Box((0,) * len(shape), tuple(shape))

    @property
    def volume(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def intersect(self, other: Box) -> Box | None:
        """The common box, or None when they share no element (0-d boxes always overlap)."""
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a, b) for a, b in zip(self.ends, other.ends))
        if any(h <= low for low, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - low for low, h in zip(lo, hi)))

    def slices_within(self, outer: Box) -> tuple[slice, ...]:
        """Index of this box inside a tensor that holds exactly ``outer``."""
        return tuple(slice(o - oo, o - oo + s) for o, oo, s in zip(self.offsets, outer.offsets, self.sizes))


@dataclass(frozen=True)
class Piece:
    """A block of a box: its own box, and where its elements start in the box's row-major buffer."""

    box: Box
    start: int


def split_box(box: Box, itemsize: int, block_bytes: int) -> list[Piece]:
    """Split ``box`` into blocks of at most ``block_bytes`` that are each a box and a contiguous
    run of the box's row-major bytes.

    Splitting happens along the outermost dimension whose trailing slab fits in a block; every
    dimension before it is walked one index at a time (a row longer than a block is cut within the
    innermost dimension). At 4 MiB blocks a [4096, 4096] bf16 weight becomes 8 row bands, and a rank
    that needs rows 1000-1999 reads only the bands that cover them.
    """
    if box.volume == 0:
        return []
    ndim = len(box.sizes)
    if ndim == 0:
        return [Piece(box, 0)]
    limit = max(1, block_bytes // max(1, itemsize))
    split_dim = ndim - 1
    for d in range(ndim):
        if math.prod(box.sizes[d + 1 :]) <= limit:
            split_dim = d
            break
    slab = math.prod(box.sizes[split_dim + 1 :])
    step = max(1, limit // max(1, slab))
    pieces: list[Piece] = []
    outer_shape = box.sizes[:split_dim]
    for flat in range(math.prod(outer_shape)):
        prefix = _unravel(flat, outer_shape)
        for lo in range(0, box.sizes[split_dim], step):
            n = min(step, box.sizes[split_dim] - lo)
            local = prefix + (lo,) + (0,) * (ndim - split_dim - 1)
            sizes = (1,) * split_dim + (n,) + box.sizes[split_dim + 1 :]
            offsets = tuple(o + x for o, x in zip(box.offsets, local))
            pieces.append(Piece(Box(offsets, sizes), _ravel(local, box.sizes)))
    return pieces


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat //= s
    return tuple(reversed(out))


def _ravel(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    flat = 0
    for i, s in zip(index, shape):
        flat = flat * s + i
    return flat


def disjoint_cover(boxes: list[Box], target: Box) -> bool:
    """True when ``boxes`` (assumed pairwise disjoint) cover every element of ``target``."""
    covered = 0
    for b in boxes:
        inter = b.intersect(target)
        if inter is not None:
            covered += inter.volume
    return covered == target.volume


def find_overlap(boxes: list[Box]) -> tuple[int, int] | None:
    """Indices of two boxes that share an element, or None. Sweep on dim 0 keeps it near-linear
    for the row bands that ``split_box`` produces."""
    if not boxes or not boxes[0].sizes:
        return (0, 1) if len(boxes) > 1 else None
    order = sorted(range(len(boxes)), key=lambda i: boxes[i].offsets[0])
    active: list[int] = []
    for i in order:
        start = boxes[i].offsets[0]
        active = [j for j in active if boxes[j].ends[0] > start]
        for j in active:
            if boxes[i].intersect(boxes[j]) is not None:
                return (j, i)
        active.append(i)
    return None
