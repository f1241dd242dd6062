"""N-dimensional boxes (offsets + sizes in global coordinates) and their overlaps."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

# The slab search's work, in (box, start) visits, before it hands over to the grid: a few times
# what blocks that tile a tensor need (two or three visits a box), so only a layout made to be slow
# gets there. The grid is a bool per cell between distinct box edges; past GRID_CELLS a layout is
# refused instead (``TooIrregular``), so no index can make the check take more than seconds.
SLAB_VISITS_PER_BOX = 16
SLAB_VISITS_MIN = 1 << 16
GRID_CELLS = 1 << 24


class TooIrregular(ValueError):
    """Boxes laid out so that checking them for overlaps would take too long (a hostile index)."""


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


def find_overlap(boxes: list[Box]) -> tuple[int, int] | None:
    """Indices ``(i, j)`` of two boxes that share an element, or None when no two do. Box ``i``
    starts no later than box ``j`` along dim 0 (on a tie, ``i < j``). A box with a zero size shares
    no element with anything; 0-d boxes (one element each) all share theirs. All boxes have the
    same number of dimensions.

    O(n log n) up to two dimensions, whatever the layout. With more, see ``_overlap_in_slabs``.

    >>> find_overlap([Box((0, 0), (2, 4)), Box((2, 0), (2, 4)), Box((3, 3), (1, 2))])
    (1, 2)
    """
    if len(boxes) < 2:
        return None
    if not boxes[0].sizes:
        return (0, 1)
    lo = [b.offsets for b in boxes]
    hi = [b.ends for b in boxes]
    ids = [i for i, b in enumerate(boxes) if min(b.sizes) > 0]
    try:
        found = _overlap(lo, hi, ids, 0, [SLAB_VISITS_PER_BOX * len(ids) + SLAB_VISITS_MIN])
    except _OverBudget:
        found = _overlap_on_grid(lo, hi, ids)
    if found is None:
        return None
    i, j = found
    return (i, j) if (lo[i][0], i) < (lo[j][0], j) else (j, i)


class _OverBudget(Exception):
    pass


_Corners = list[tuple[int, ...]]


def _overlap(lo: _Corners, hi: _Corners, ids: list[int], dim: int, budget: list[int]) -> tuple[int, int] | None:
    """Two of the non-empty boxes ``ids`` that overlap along every dimension from ``dim`` on.
    ``budget[0]``: the visits left (raises ``_OverBudget`` when they run out)."""
    if len(ids) < 2:
        return None
    budget[0] -= len(ids)
    if budget[0] < 0:
        raise _OverBudget
    if len(lo[ids[0]]) - dim <= 2:
        return _overlap_by_sweep(lo, hi, ids, dim)
    return _overlap_in_slabs(lo, hi, ids, dim, budget)


def _overlap_by_sweep(lo: _Corners, hi: _Corners, ids: list[int], dim: int) -> tuple[int, int] | None:
    """Sweep along ``dim`` (the next-to-last or the last dimension) in order of start.

    The boxes still open at the sweep position all contain it, so until two of them overlap, their
    intervals along the next dimension are disjoint: in order of start, their ends ascend too, and
    the ones that meet a new interval are the last few of those that start before it ends. Checking
    those from the last, a closed box is dropped for good (no later box can meet it) and an open one
    is an overlap; each box is kept and dropped once, so the sweep is O(n log n). Past the last
    dimension every box's interval is the same single point, which makes this a 1-D sweep."""
    nxt = dim + 1
    if nxt == len(lo[ids[0]]):
        a_lo, a_hi = [0] * len(ids), [1] * len(ids)
    else:
        a_lo, a_hi = [lo[i][nxt] for i in ids], [hi[i][nxt] for i in ids]
    # Slot s of ``kept`` is for the box with the s-th lowest start along ``nxt``.
    slots = sorted(range(len(ids)), key=a_lo.__getitem__)
    box = [ids[s] for s in slots]
    a_lo, a_hi = [a_lo[s] for s in slots], [a_hi[s] for s in slots]
    x_lo, x_hi = [lo[i][dim] for i in box], [hi[i][dim] for i in box]
    kept = _TakenSlots(len(box))
    for new in sorted(range(len(box)), key=x_lo.__getitem__):
        below = bisect.bisect_left(a_lo, a_hi[new])
        while (s := kept.last_below(below)) is not None and a_hi[s] > a_lo[new]:
            if x_hi[s] > x_lo[new]:
                return (box[s], box[new])
            kept.free(s)
            below = s
        kept.take(new)
    return None


class _TakenSlots:
    """Slots ``0..n-1``, each taken or not; finds the last taken slot below a position in O(log n).
    A Fenwick tree of counts: a sorted list would do with less code, but its O(n) inserts turn the
    sweep quadratic when boxes arrive in the wrong order (each new interval left of the others)."""

    def __init__(self, n: int) -> None:
        self._counts = [0] * (n + 1)  # _counts[i]: how many of slots [i - lowbit(i), i) are taken
        self._top = 1 << (n.bit_length() - 1) if n else 0

    def take(self, slot: int) -> None:
        self._add(slot, 1)

    def free(self, slot: int) -> None:
        self._add(slot, -1)

    def _add(self, slot: int, delta: int) -> None:
        counts, n = self._counts, len(self._counts)
        i = slot + 1
        while i < n:
            counts[i] += delta
            i += i & -i

    def last_below(self, pos: int) -> int | None:
        """The highest taken slot below ``pos``, or None."""
        counts, n = self._counts, len(self._counts)
        k, i = 0, pos
        while i:
            k += counts[i]
            i &= i - 1
        if not k:
            return None
        slot, step = 0, self._top  # descend to the k-th taken slot
        while step:
            j = slot + step
            if j < n and counts[j] < k:
                slot = j
                k -= counts[j]
            step >>= 1
        return slot


def _overlap_in_slabs(
    lo: _Corners, hi: _Corners, ids: list[int], dim: int, budget: list[int],
) -> tuple[int, int] | None:
    """At each start along ``dim``, the boxes open there all contain it, so two of them overlap
    exactly when they do along the dimensions after ``dim``: look there, one dimension down. Two
    boxes that overlap are both open at the later of their starts, so none is missed.

    The cost is the number of (box, start inside it along ``dim``) pairs: about n for blocks that
    tile a tensor, which each contain few other blocks' starts (``split_box`` walks the leading
    dimensions one index at a time), but up to n^2 for boxes made to span many others' starts in
    every leading dimension, as a hostile index could. Bounding that too takes range trees."""
    order = sorted(ids, key=lambda i: lo[i][dim])
    open_: list[int] = []
    k = 0
    while k < len(order):
        x = lo[order[k]][dim]
        open_ = [j for j in open_ if hi[j][dim] > x]
        while k < len(order) and lo[order[k]][dim] == x:
            open_.append(order[k])
            k += 1
        found = _overlap(lo, hi, open_, dim + 1, budget)
        if found is not None:
            return found
    return None


def _overlap_on_grid(lo: _Corners, hi: _Corners, ids: list[int]) -> tuple[int, int] | None:
    """The same answer by painting each box on a grid whose cells lie between distinct box edges:
    a box that finds a cell painted overlaps an earlier one. Its cost is the grid's cells plus the
    boxes, whatever their layout; a grid over ``GRID_CELLS`` is refused (``TooIrregular``)."""
    ndim = len(lo[ids[0]])
    edges = [np.unique(np.array([c[d] for i in ids for c in (lo[i], hi[i])], dtype=np.int64)) for d in range(ndim)]
    cells = math.prod(len(e) - 1 for e in edges)
    if cells > GRID_CELLS:
        raise TooIrregular(
            f"{len(ids)} blocks whose edges cut the tensor into {cells} cells: too irregular a layout to check "
            f"for overlaps (at most {GRID_CELLS} cells)"
        )
    painted = np.zeros([len(e) - 1 for e in edges], dtype=bool)
    for n, j in enumerate(ids):
        where = tuple(
            slice(int(np.searchsorted(e, lo[j][d])), int(np.searchsorted(e, hi[j][d]))) for d, e in enumerate(edges)
        )
        if painted[where].any():
            i = next(i for i in ids[:n] if all(lo[i][d] < hi[j][d] and lo[j][d] < hi[i][d] for d in range(ndim)))
            return (i, j)
        painted[where] = True
    return None
