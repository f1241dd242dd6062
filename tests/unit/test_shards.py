"""Strided and plain shard index math (planning/shards.py), checked against torch's own splitting."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

from shardckpt.planning.boxes import Box, find_overlap
from shardckpt.planning.shards import DimSplit, dim_runs, local_parts, split_runs

pytestmark = pytest.mark.timeout(120)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _torch_local(shape: tuple[int, ...], mesh: tuple[int, ...], coord: tuple[int, ...], placements: list) -> torch.Tensor:
    """The local shard DTensor's placement semantics give: split left to right with the placements'
    own ``_split_tensor`` (torch.chunk for Shard; the strided split for _StridedShard)."""
    t = torch.arange(math.prod(shape)).reshape(shape)
    for size, c, p in zip(mesh, coord, placements):
        if isinstance(p, Replicate):
            continue
        shards, _ = p._split_tensor(t, size, with_padding=False, contiguous=True)
        t = shards[c]
    return t


def _ours(shape: tuple[int, ...], mesh: tuple[int, ...], coord: tuple[int, ...], placements: list) -> torch.Tensor:
    splits = []
    for size, c, p in zip(mesh, coord, placements):
        if isinstance(p, _StridedShard):
            splits.append(DimSplit(p.dim, size, c, p.split_factor))
        elif isinstance(p, Shard):
            splits.append(DimSplit(p.dim, size, c))
    local_shape, parts = local_parts(shape, splits)
    glob = torch.arange(math.prod(shape)).reshape(shape)
    out = torch.full(local_shape, -1, dtype=glob.dtype)
    for part in parts:
        assert part.box.sizes == part.local.sizes
        out[part.local.slices_within(Box.full(local_shape))] = glob[part.box.slices_within(Box.full(shape))]
    # The parts tile the local shard exactly once.
    assert sum(p.local.volume for p in parts) == math.prod(local_shape)
    assert find_overlap([p.local for p in parts]) is None
    return out


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0, 13)) for _ in range(ndim))
    mesh = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 3))))
    coord = tuple(draw(st.integers(0, m - 1)) for m in mesh)
    placements = []
    for _ in mesh:
        kind = draw(st.sampled_from(["r", "s", "ss"]))
        dim = draw(st.integers(0, ndim - 1))
        if kind == "r":
            placements.append(Replicate())
        elif kind == "s":
            placements.append(Shard(dim))
        else:
            placements.append(_StridedShard(dim, split_factor=draw(st.integers(1, 4))))
    return shape, mesh, coord, placements


@SETTINGS
@given(layouts())
def test_local_parts_match_torch_splitting(layout):
    shape, mesh, coord, placements = layout
    want = _torch_local(shape, mesh, coord, placements)
    got = _ours(shape, mesh, coord, placements)
    assert tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got, want)


@SETTINGS
@given(layouts())
def test_every_rank_together_covers_the_tensor_once(layout):
    shape, mesh, _, placements = layout
    counts = torch.zeros(shape, dtype=torch.int64)
    for coord in itertools.product(*(range(m) for m in mesh)):
        local = _ours(shape, mesh, coord, placements)
        counts.view(-1).index_add_(0, local.reshape(-1), torch.ones(local.numel(), dtype=torch.int64))
    replicas = math.prod(m for m, p in zip(mesh, placements) if isinstance(p, Replicate))
    assert torch.equal(counts, torch.full(shape, replicas, dtype=torch.int64))


def test_fsdp_over_tp_is_one_box_per_rank():
    # [_StridedShard(0, sf=2), Shard(0)] on a (dp=2, tp=2) mesh: the docstring table of _StridedShard.
    rows = {}
    for dp in range(2):
        for tp in range(2):
            _, parts = local_parts((8, 8), [DimSplit(0, 2, dp, 2), DimSplit(0, 2, tp)])
            assert len(parts) == 1
            rows[(dp, tp)] = (parts[0].box.offsets[0], parts[0].box.sizes[0])
    assert rows == {(0, 0): (0, 2), (0, 1): (4, 2), (1, 0): (2, 2), (1, 1): (6, 2)}


def test_strided_shard_alone_is_several_boxes():
    # The uneven example of _StridedShard._to_replicate_tensor: 9 rows, sf=2, 4 chunks.
    assert [split_runs([(0, 9)], DimSplit(0, 4, c, 2)) for c in range(4)] == [
        [(0, 2), (5, 1)], [(2, 2), (6, 1)], [(4, 1), (7, 1)], [(8, 1)],
    ]
    shape, parts = local_parts((9, 3), [DimSplit(0, 4, 0, 2)])
    assert shape == (3, 3)
    assert [(p.box, p.local) for p in parts] == [
        (Box((0, 0), (2, 3)), Box((0, 0), (2, 3))),
        (Box((5, 0), (1, 3)), Box((2, 0), (1, 3))),
    ]


def test_runs_merge_and_empty_shards():
    assert dim_runs((6, 4), [DimSplit(1, 2, 1, 1)]) == [[(0, 6)], [(2, 2)]]
    # sf=1 strided is a plain shard.
    assert split_runs([(0, 10)], DimSplit(0, 3, 2, 1)) == split_runs([(0, 10)], DimSplit(0, 3, 2))
    assert local_parts((3, 5), [DimSplit(0, 4, 3)]) == ((0, 5), [])
    shape, parts = local_parts((), [])  # a 0-d tensor is one element: one empty-dimensioned box
    assert shape == () and [(p.box, p.local) for p in parts] == [(Box((), ()), Box((), ()))]


def test_invalid_splits_raise_value_error():
    with pytest.raises(ValueError):
        split_runs([(0, 4)], DimSplit(0, 2, 2))
    with pytest.raises(ValueError):
        dim_runs((4,), [DimSplit(1, 2, 0)])
