"""Box geometry, the save plan and the load plan, checked against brute-force element sets."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardckpt import IncompleteCheckpointError, IndexFormatError, ReplicaMismatchError, StateMismatchError
from shardckpt.format.schema import DTYPES, BlockEntry, TensorEntry
from shardckpt.planning.boxes import Box, disjoint_cover, find_overlap, split_box
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


# --- intersect, find_overlap, disjoint_cover ----------------------------------------------------


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


@SETTINGS
@given(data=st.data(), ndim=st.integers(0, 3), n=st.integers(0, 7))
def test_find_overlap_matches_brute_force(data, ndim, n):
    bs = [data.draw(boxes(ndim, max_offset=8, max_size=4)) for _ in range(n)]
    sets = [elements(b) for b in bs]
    clashing = {(i, j) for i, j in itertools.combinations(range(n), 2) if sets[i] & sets[j]}
    found = find_overlap(bs)
    if not clashing:
        assert found is None
    else:
        assert found is not None
        i, j = found
        assert i != j and sets[i] & sets[j], f"find_overlap returned {found} for {bs}"


@SETTINGS
@given(data=st.data(), ndim=st.integers(0, 3))
def test_disjoint_cover_matches_brute_force(data, ndim):
    whole = data.draw(boxes(ndim, max_size=6))
    pieces = split_box(whole, data.draw(st.sampled_from([1, 4])), data.draw(st.integers(1, 40)))
    kept = [p.box for p in pieces if data.draw(st.booleans())]
    target = data.draw(boxes(ndim, max_offset=6, max_size=6))
    union = set().union(*(elements(b) for b in kept)) if kept else set()
    assert disjoint_cover(kept, target) == (elements(target) <= union)


@SETTINGS
@given(data=st.data(), ndim=st.integers(1, 3), n=st.integers(0, 5))
def test_disjoint_cover_random_disjoint_boxes(data, ndim, n):
    bs = [data.draw(boxes(ndim, max_offset=6, max_size=3)) for _ in range(n)]
    sets = [elements(b) for b in bs]
    assume(all(not (sets[i] & sets[j]) for i, j in itertools.combinations(range(n), 2)))
    target = data.draw(boxes(ndim, max_offset=6, max_size=4))
    union = set().union(*sets) if sets else set()
    assert disjoint_cover(bs, target) == (elements(target) <= union)


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
