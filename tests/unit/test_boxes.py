"""Box geometry, the save plan and the load plan, checked against brute-force element sets."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardckpt import IncompleteCheckpointError, IndexFormatError, ReplicaMismatchError, StateMismatchError
from shardckpt.format.schema import DTYPES, BlockEntry, TensorEntry
from shardckpt.planning import boxes as box_module
from shardckpt.planning.boxes import Box, find_overlap, split_box
from shardckpt.planning.load_plan import plan_reads
from shardckpt.planning.save_plan import plan_save

pytestmark = pytest.mark.timeout(120)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPE_NAMES = sorted(DTYPES)


def elements(box: Box) -> set[tuple[int, ...]]:
    return set(itertools.product(*(range(o, o + s) for o, s in zip(box.offsets, box.sizes))))


@st.composite
def boxes(draw, ndim: int | None = None, max_offset: int = 5, max_size: int = 6, min_size: int = 0) -> Box:
    if ndim is None:
        ndim = draw(st.integers(0, 4))
    offsets = tuple(draw(st.integers(0, max_offset)) for _ in range(ndim))
    sizes = tuple(draw(st.integers(min_size, max_size)) for _ in range(ndim))
    return Box(offsets, sizes)


@st.composite
def box_within(draw, shape: tuple[int, ...]) -> Box:
    offsets, sizes = [], []
    for d in shape:
        lo = draw(st.integers(0, d))
        hi = draw(st.integers(lo, d))
        offsets.append(lo)
        sizes.append(hi - lo)
    return Box(tuple(offsets), tuple(sizes))


# --- split_box ----------------------------------------------------------------------------------


@SETTINGS
@given(box=boxes(max_size=9), itemsize=st.sampled_from([1, 2, 4, 8, 16]), block_bytes=st.integers(1, 300))
def test_split_box_pieces_are_contiguous_runs_covering_the_box(box, itemsize, block_bytes):
    pieces = split_box(box, itemsize, block_bytes)
    if box.volume == 0:
        assert pieces == []
        return
    flat = torch.arange(box.volume).reshape(box.sizes)
    seen: Counter[tuple[int, ...]] = Counter()
    for p in pieces:
        assert len(p.box.sizes) == len(box.sizes)
        assert p.box.volume > 0
        assert p.box.intersect(box) == p.box or not box.sizes, f"{p} leaves {box}"
        # Each piece is the run [start, start + volume) of the box's row-major element order.
        got = flat[p.box.slices_within(box)].flatten()
        assert torch.equal(got, torch.arange(p.start, p.start + p.box.volume)), (box, p)
        # Within the block size, unless a single element is bigger than a block.
        assert p.box.volume * itemsize <= max(block_bytes, itemsize), (box, p, block_bytes)
        seen.update(elements(p.box))
    assert all(n == 1 for n in seen.values()), "pieces overlap"
    assert set(seen) == elements(box), "pieces do not cover the box"
    starts = sorted((p.start, p.box.volume) for p in pieces)
    assert starts[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(starts, starts[1:]))
    if box.volume * itemsize <= block_bytes:
        assert len(pieces) == 1, "a box that fits in one block must not be split"


def test_split_box_row_bands():
    # A [4096, 4096] bf16 weight (32 MiB) in 4 MiB blocks is 8 bands of 512 full rows.
    box = Box((0, 0), (4096, 4096))
    pieces = split_box(box, 2, 4 << 20)
    assert [p.box for p in pieces] == [Box((512 * i, 0), (512, 4096)) for i in range(8)]
    assert [p.start for p in pieces] == [512 * 4096 * i for i in range(8)]


def test_split_box_zero_dim_and_empty():
    assert [(p.box, p.start) for p in split_box(Box((), ()), 4, 1)] == [(Box((), ()), 0)]
    assert split_box(Box((3, 0), (5, 0)), 4, 1024) == []


# --- intersect, find_overlap --------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), ndim=st.integers(0, 4))
def test_intersect_matches_brute_force(data, ndim):
    a = data.draw(boxes(ndim))
    b = data.draw(boxes(ndim))
    common = elements(a) & elements(b)
    inter = a.intersect(b)
    if not common:
        assert inter is None
    else:
        assert inter is not None and elements(inter) == common
        assert inter.volume == len(common)
    assert (inter is None) == (b.intersect(a) is None)
    if inter is not None:
        assert b.intersect(a) == inter


def _check_overlap_result(bs: list[Box], found: tuple[int, int] | None) -> None:
    """``found`` against a brute-force count of every element: a pair of boxes sharing an element,
    the first starting no later along dim 0 (lower index on a tie), or None when none share one."""
    counts: Counter[tuple[int, ...]] = Counter()
    for b in bs:
        counts.update(elements(b))
    if all(c == 1 for c in counts.values()):
        assert found is None, f"find_overlap returned {found} for disjoint {bs}"
        return
    assert found is not None, f"find_overlap missed an overlap in {bs}"
    i, j = found
    assert i != j and elements(bs[i]) & elements(bs[j]), f"find_overlap returned {found} for {bs}"
    if bs[i].sizes:
        assert (bs[i].offsets[0], i) < (bs[j].offsets[0], j), f"pair {found} out of order for {bs}"
    else:
        assert found == (0, 1)


@SETTINGS
@given(data=st.data(), ndim=st.integers(0, 4), n=st.integers(0, 10))
def test_find_overlap_matches_brute_force(data, ndim, n):
    bs = [data.draw(boxes(ndim, max_offset=8, max_size=4)) for _ in range(n)]
    _check_overlap_result(bs, find_overlap(bs))


@SETTINGS
@given(data=st.data(), ndim=st.integers(1, 4), n=st.integers(0, 10))
def test_the_grid_that_bounds_a_hostile_layout_matches_brute_force(data, ndim, n):
    bs = [data.draw(boxes(ndim, max_offset=8, max_size=4)) for _ in range(n)]
    saved = box_module.SLAB_VISITS_PER_BOX, box_module.SLAB_VISITS_MIN
    box_module.SLAB_VISITS_PER_BOX, box_module.SLAB_VISITS_MIN = 0, 0  # straight to the grid
    try:
        _check_overlap_result(bs, find_overlap(bs))
    finally:
        box_module.SLAB_VISITS_PER_BOX, box_module.SLAB_VISITS_MIN = saved


def _staircase(n: int) -> TensorEntry:
    """2n-1 blocks that tile an n x n x 1 tensor with every start along dim 0 inside about n
    blocks: quadratic for the slab search (94 s at n = 4000 before the budget; an index of 0.6 MB)."""
    upper = [((i, i, 0), (n - i, 1, 1)) for i in range(n)]
    lower = [((0, j, 0), (j, 1, 1)) for j in range(1, n)]
    blocks = tuple(BlockEntry(o, z, 0, 64 + k, 1, math.prod(z), "raw", "0" * 16)
                   for k, (o, z) in enumerate(upper + lower))
    return TensorEntry("t", ("t",), "uint8", (n, n, 1), None, blocks)


@pytest.mark.timeout(30)
def test_a_layout_made_to_be_slow_is_planned_in_bounded_time_or_refused():
    entry = _staircase(4000)
    reads = plan_reads(entry, Box.full(entry.shape), "ckpt")
    assert sum(r.overlap.volume for r in reads) == 4000 * 4000
    # An overlap hidden in such a layout is still found.
    bad = TensorEntry("t", ("t",), "uint8", entry.shape, None, entry.blocks + (entry.blocks[-1],))
    with pytest.raises(IndexFormatError, match="ckpt: tensor 't' has overlapping blocks"):
        plan_reads(bad, Box.full(bad.shape), "ckpt")
    # Past the grid's bound the layout is refused, naming the tensor.
    entry = _staircase(5000)
    with pytest.raises(IndexFormatError, match="ckpt: tensor 't': 9999 blocks .* too irregular"):
        plan_reads(entry, Box.full(entry.shape), "ckpt")


@st.composite
def tilings(draw, ndim: int) -> list[Box]:
    """Blocks the way a save lays them out: a grid of writer boxes over a small shape, each split
    by ``split_box``, in random order; sometimes one extra box (maybe empty) lands among them."""
    cells = []
    for size in draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)):
        cuts = sorted(draw(st.sets(st.integers(1, size - 1))) if size > 1 else set())
        bounds = [0, *cuts, size]
        cells.append(list(zip(bounds, bounds[1:])))
    bs = []
    for cell in itertools.product(*cells):
        writer = Box(tuple(lo for lo, _ in cell), tuple(hi - lo for lo, hi in cell))
        bs += [p.box for p in split_box(writer, 1, draw(st.integers(1, 12)))]
    bs = draw(st.permutations(bs))
    if draw(st.booleans()):
        bs.insert(draw(st.integers(0, len(bs))), draw(boxes(ndim, max_offset=4, max_size=3)))
    return bs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ndim=st.integers(1, 4))
def test_find_overlap_on_block_layouts(data, ndim):
    bs = data.draw(tilings(ndim))
    _check_overlap_result(bs, find_overlap(bs))


def _row_of_blocks(ndim: int, n: int) -> list[Box]:
    """``n`` blocks of 7 elements along the last dimension, in one row of the leading ones (in 3-D
    and up: 100 rows of the next-to-last one), shuffled."""
    rows = 100 if ndim >= 3 else 1
    per_row = n // rows
    bs = []
    for k in range(n):
        row, col = divmod(k, per_row)
        lead = (0,) * (ndim - 2) + (row,) if ndim >= 2 else ()
        bs.append(Box(lead + (7 * col,), (1,) * (ndim - 1) + (7,)))
    random.Random(ndim).shuffle(bs)
    return bs


def _insert_overlapping(bs: list[Box], extra: Box) -> None:
    """``bs`` is disjoint; with ``extra`` in the middle, the pair found must include it."""
    assert find_overlap(bs) is None
    at = len(bs) // 2
    bs.insert(at, extra)
    found = find_overlap(bs)
    assert found is not None and at in found
    i, j = found
    assert bs[i].intersect(bs[j]) is not None
    assert (bs[i].offsets[0], i) < (bs[j].offsets[0], j)


# 100,000 blocks that are all open at once in a sweep along dim 0, so that checking each new block
# against the open ones is quadratic: hours for the old code (8,000 blocks in one row took minutes).


@pytest.mark.parametrize("ndim", [2, 3, 5])
def test_find_overlap_100k_blocks_in_a_row(ndim):
    bs = _row_of_blocks(ndim, 100_000)
    first = bs[0]
    _insert_overlapping(bs, Box(first.offsets[:-1] + (first.offsets[-1] + 3,), first.sizes))


def test_find_overlap_100k_staggered_columns():
    # Column n - k spans rows [k, k + n): each one is open at every later start along dim 0, and
    # each new one lands left of all the open ones (the worst order for a sorted list of them).
    n = 100_000
    bs = [Box((k, n - k), (n, 1)) for k in range(n)]
    random.Random(0).shuffle(bs)
    _insert_overlapping(bs, Box((n, n // 3), (1, 2)))  # meets columns n/3 and n/3 + 1 at row n


# --- plan_save ----------------------------------------------------------------------------------


def _chunks(size: int, parts: int) -> list[tuple[int, int]]:
    """torch.chunk / DTensor Shard semantics: ceil-sized chunks, trailing ones may be empty."""
    step = -(-size // parts) if parts else 0
    return [(min(i * step, size), max(0, min((i + 1) * step, size) - min(i * step, size))) for i in range(parts)]


@st.composite
def rank_metas(draw):
    """Per-rank metas built the way TensorItem.meta() builds them, for random layouts."""
    world = draw(st.integers(1, 5))
    metas: list[dict[str, list[list[object]]]] = [{"tensors": [], "values": []} for _ in range(world)]
    layouts = {}
    for t in range(draw(st.integers(1, 4))):
        key = f"t{t}"
        dtype = draw(st.sampled_from(DTYPE_NAMES))
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
        kinds = ["plain", "plain_subset", "per_rank"] + (["shard", "shard_replicate"] if shape else [])
        kind = draw(st.sampled_from(kinds))
        layouts[key] = kind
        full = Box.full(shape)

        def add(rank, box, per_rank=False, plain=True, shape=shape, key=key, dtype=dtype):
            metas[rank]["tensors"].append(
                [key, [key], dtype, list(shape), list(box.offsets), list(box.sizes), per_rank, plain]
            )

        if kind == "plain":
            for r in range(world):
                add(r, full)
        elif kind == "plain_subset":
            holders = draw(st.lists(st.integers(0, world - 1), min_size=1, unique=True))
            for r in holders:
                add(r, full)
        elif kind == "per_rank":
            for r in range(world):
                own = tuple(draw(st.lists(st.integers(0, 6), min_size=len(shape), max_size=len(shape))))
                add(r, Box.full(own), per_rank=True, shape=own)
        else:
            dim = draw(st.integers(0, len(shape) - 1))
            if kind == "shard":
                groups, replicas = world, 1
            else:  # a 2-D mesh (replicas x groups): Replicate on mesh dim 0, Shard(dim) on mesh dim 1
                divisors = [d for d in range(1, world + 1) if world % d == 0]
                groups = draw(st.sampled_from(divisors))
                replicas = world // groups
            for r in range(world):
                lo, n = _chunks(shape[dim], groups)[r % groups]
                offsets = [0] * len(shape)
                sizes = list(shape)
                offsets[dim], sizes[dim] = lo, n
                add(r, Box(tuple(offsets), tuple(sizes)), plain=False)
            assert replicas * groups == world
    return world, metas, layouts


def _held(metas, key, entry_rank):
    """rank -> boxes it holds of the tensor identified by (key, entry_rank)."""
    out: dict[int, list[Box]] = {}
    for rank, meta in enumerate(metas):
        for k, _, _, _, offsets, sizes, per_rank, _ in meta["tensors"]:
            if k == key and (rank if per_rank else None) == entry_rank:
                out.setdefault(rank, []).append(Box(tuple(offsets), tuple(sizes)))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rank_metas(), block_bytes=st.sampled_from([1, 7, 64, 1024, 1 << 20]))
def test_plan_save_writes_every_element_once_from_a_holder(case, block_bytes):
    world, metas, _ = case
    plan = plan_save(metas, block_bytes)
    assert sorted(plan.writes) == list(range(world))
    idents = {(s.key, s.entry_rank) for s in plan.tensors}
    assert len(idents) == len(plan.tensors), "a tensor is planned twice"
    expected = set()
    for rank, meta in enumerate(metas):
        for key, _, _, _, _, _, per_rank, _ in meta["tensors"]:
            expected.add((key, rank if per_rank else None))
    assert idents == expected
    for spec in plan.tensors:
        ident = (spec.key, spec.entry_rank)
        held = _held(metas, *ident)
        counts: Counter[tuple[int, ...]] = Counter()
        for writer, items in plan.writes.items():
            for w in items:
                if (w.key, w.entry_rank) != ident:
                    continue
                assert w.box.volume > 0
                counts.update(elements(w.box))
                # The writer holds the data it writes.
                assert any(w.box.intersect(b) == w.box or not b.sizes for b in held.get(writer, [])), (
                    f"rank {writer} writes {w.box} of {ident} but holds {held.get(writer)}"
                )
        assert all(n == 1 for n in counts.values()), f"{ident}: some element is written twice"
        assert set(counts) == elements(Box.full(spec.shape)), f"{ident}: not every element is written"


def _meta(key, shape, box, dtype="float32", per_rank=False, plain=True):
    return [key, [key], dtype, list(shape), list(box.offsets), list(box.sizes), per_rank, plain]


def test_plan_save_spreads_a_big_replica_over_its_holders():
    shape = (1024, 256)  # 1 MiB of float32 held by 4 ranks, 16 KiB blocks
    metas = [{"tensors": [_meta("w", shape, Box.full(shape))], "values": []} for _ in range(4)]
    plan = plan_save(metas, 16 << 10)
    per_rank = [sum(w.box.volume for w in plan.writes[r]) for r in range(4)]
    assert per_rank == [256 * 256] * 4


def test_plan_save_rejects_overlapping_unequal_shards():
    a = {"tensors": [_meta("w", (8, 4), Box((0, 0), (5, 4)), plain=False)], "values": []}
    b = {"tensors": [_meta("w", (8, 4), Box((4, 0), (4, 4)), plain=False)], "values": []}
    with pytest.raises(StateMismatchError, match="'w'"):
        plan_save([a, b], 1024)


def test_plan_save_rejects_shards_with_a_hole():
    a = {"tensors": [_meta("w", (8, 4), Box((0, 0), (3, 4)), plain=False)], "values": []}
    b = {"tensors": [_meta("w", (8, 4), Box((4, 0), (4, 4)), plain=False)], "values": []}
    with pytest.raises(StateMismatchError, match="'w'.*28 of 32"):
        plan_save([a, b], 1024)


def test_plan_save_rejects_dtype_mismatch_between_ranks():
    a = {"tensors": [_meta("w", (4,), Box.full((4,)))], "values": []}
    b = {"tensors": [_meta("w", (4,), Box.full((4,)), dtype="bfloat16")], "values": []}
    with pytest.raises(StateMismatchError, match="'w'.*rank 1"):
        plan_save([a, b], 1024)


def test_plan_save_rejects_mixed_per_rank_and_tensor_value_kinds():
    a = {"tensors": [_meta("w", (4,), Box.full((4,)), per_rank=True)], "values": []}
    b = {"tensors": [_meta("w", (4,), Box.full((4,)))], "values": []}
    with pytest.raises(StateMismatchError, match="'w'"):
        plan_save([a, b], 1024)
    c = {"tensors": [], "values": [["w", ["w"], 3, False]]}
    with pytest.raises(StateMismatchError, match="'w'.*rank 1"):
        plan_save([{"tensors": [_meta("w", (4,), Box.full((4,)))], "values": []}, c], 1024)


def test_plan_save_values_must_agree_unless_per_rank():
    metas = [{"tensors": [], "values": [["step", ["step"], r, False]]} for r in range(2)]
    with pytest.raises(ReplicaMismatchError, match="'step'.*rank 0.*rank 1"):
        plan_save(metas, 1024)
    metas = [{"tensors": [], "values": [["step", ["step"], r, True]]} for r in range(2)]
    plan = plan_save(metas, 1024)
    assert [(v.key, v.entry_rank, v.value) for v in plan.values] == [("step", 0, 0), ("step", 1, 1)]


# --- plan_reads ---------------------------------------------------------------------------------


def _entry(spec, plan, block_bytes) -> TensorEntry:
    """A TensorEntry whose blocks are exactly what the writers would store for ``spec``."""
    itemsize = DTYPES[spec.dtype].itemsize
    blocks = []
    for writer, items in plan.writes.items():
        for w in items:
            if (w.key, w.entry_rank) == (spec.key, spec.entry_rank):
                for p in split_box(w.box, itemsize, block_bytes):
                    blocks.append(BlockEntry(p.box.offsets, p.box.sizes, writer, 0, 0, p.box.volume * itemsize,
                                             "raw", "0" * 16))
    return TensorEntry(spec.key, spec.path, spec.dtype, spec.shape, spec.entry_rank, tuple(blocks))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rank_metas(), block_bytes=st.sampled_from([1, 16, 64, 1 << 20]), data=st.data())
def test_plan_reads_finds_exactly_the_needed_blocks(case, block_bytes, data):
    _, metas, _ = case
    plan = plan_save(metas, block_bytes)
    for spec in plan.tensors:
        entry = _entry(spec, plan, block_bytes)
        needed = data.draw(box_within(spec.shape))
        want = elements(needed)
        reads = plan_reads(entry, needed, "ckpt")
        touching = [b for b in entry.blocks if elements(Box(b.offsets, b.sizes)) & want]
        assert sorted(map(repr, (r.block for r in reads))) == sorted(map(repr, touching))
        covered: Counter[tuple[int, ...]] = Counter()
        for r in reads:
            assert r.box == Box(r.block.offsets, r.block.sizes)
            assert elements(r.overlap) == elements(r.box) & want
            covered.update(elements(r.overlap))
        assert set(covered) == want and all(n == 1 for n in covered.values())
        if touching and needed.volume:
            # Losing any block that holds needed data is reported, not filled with garbage.
            drop = data.draw(st.sampled_from(touching))
            holed = TensorEntry(entry.key, entry.path, entry.dtype, entry.shape, entry.rank,
                                tuple(b for b in entry.blocks if b is not drop))
            with pytest.raises(IncompleteCheckpointError, match=f"ckpt: tensor '{spec.key}' is incomplete"):
                plan_reads(holed, needed, "ckpt")
            doubled = TensorEntry(entry.key, entry.path, entry.dtype, entry.shape, entry.rank,
                                  entry.blocks + (drop,))
            with pytest.raises(IndexFormatError, match=f"ckpt: tensor '{spec.key}' has overlapping blocks"):
                plan_reads(doubled, needed, "ckpt")


def test_plan_reads_partial_read_of_row_bands():
    shape = (4096, 4096)
    pieces = split_box(Box.full(shape), 2, 4 << 20)
    blocks = tuple(BlockEntry(p.box.offsets, p.box.sizes, 0, 0, 0, p.box.volume * 2, "raw", "0" * 16) for p in pieces)
    entry = TensorEntry("w", ("w",), "bfloat16", shape, None, blocks)
    reads = plan_reads(entry, Box((1000, 0), (1000, 4096)), "ckpt")
    assert [r.box.offsets[0] for r in reads] == [512, 1024, 1536]
    assert sum(r.overlap.volume for r in reads) == 1000 * 4096
    assert math.prod(reads[0].overlap.sizes) == (1024 - 1000) * 4096
