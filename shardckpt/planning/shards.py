"""Which global indices a rank's local shard holds, for DTensor-style placements (pure math).

A placement list shards tensor dimensions one mesh dimension at a time, left to right. Each step
splits the indices this rank holds so far along one tensor dimension:

- ``Shard``: ``torch.chunk`` into ``mesh_size`` pieces (chunk size ``ceil(n / mesh_size)``, the last
  pieces possibly short or empty), keeping piece ``coord``;
- ``_StridedShard(split_factor=f)`` (FSDP2 over tensor parallel on the same dimension): chunk into
  ``f`` pieces, chunk each of those into ``mesh_size`` pieces, and keep piece ``coord`` of every one,
  concatenated in order. That is the right-to-left sharding that FSDP2 applies on top of TP, written
  left to right.

Dimensions are independent, so a local shard is the product of one list of index *runs* per
dimension (``(global start, length)``, in local order). With every placement of a FSDP2 + TP layout
applied the lists have one run each and the shard is one box; a strided shard on its own (a 1-D mesh
slice of such a layout, or views that DTensor turns into strided shards) holds several runs, and its
shard is several boxes. Nothing here gathers data: it only says where each local element lives.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from shardckpt.planning.boxes import Box

Run = tuple[int, int]  # (global start, length)


@dataclass(frozen=True)
class DimSplit:
    """One placement's split of one tensor dimension: ``mesh_size`` ranks, this rank at ``coord``;
    ``split_factor`` is 1 for ``Shard`` and f for ``_StridedShard(split_factor=f)``."""

    dim: int
    mesh_size: int
    coord: int
    split_factor: int = 1


@dataclass(frozen=True)
class LocalPart:
    """A box of the global tensor (``box``) and where it sits in the local shard (``local``)."""

    box: Box
    local: Box


def _chunk(length: int, pieces: int, index: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of piece ``index`` of ``torch.chunk`` over ``length`` positions."""
    size = -(-length // pieces)  # ceil
    lo = min(index * size, length)
    return lo, min(lo + size, length)


def _take(runs: list[Run], lo: int, hi: int) -> list[Run]:
    """The runs that hold positions ``[lo, hi)`` of the concatenation of ``runs``."""
    out: list[Run] = []
    pos = 0
    for start, n in runs:
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((start + a - pos, b - a))
        pos += n
        if pos >= hi:
            break
    return out


def _merge(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for start, n in runs:
        if n == 0:
            continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out


def split_runs(runs: list[Run], split: DimSplit) -> list[Run]:
    """Apply one split to the runs of its dimension."""
    if split.mesh_size < 1 or not 0 <= split.coord < split.mesh_size or split.split_factor < 1:
        raise ValueError(f"invalid split {split}")
    total = sum(n for _, n in runs)
    out: list[Run] = []
    for f in range(split.split_factor):
        f_lo, f_hi = _chunk(total, split.split_factor, f)
        lo, hi = _chunk(f_hi - f_lo, split.mesh_size, split.coord)
        out.extend(_take(runs, f_lo + lo, f_lo + hi))
    return _merge(out)


def dim_runs(shape: tuple[int, ...], splits: list[DimSplit]) -> list[list[Run]]:
    """For each dimension, the global index runs this rank holds, in local order."""
    runs: list[list[Run]] = [_merge([(0, n)]) for n in shape]
    for s in splits:
        if not 0 <= s.dim < len(shape):
            raise ValueError(f"split of dimension {s.dim} of a {len(shape)}-d tensor")
        runs[s.dim] = split_runs(runs[s.dim], s)
    return runs


def local_parts(shape: tuple[int, ...], splits: list[DimSplit]) -> tuple[tuple[int, ...], list[LocalPart]]:
    """(local shape, the boxes of the local shard). Adjacent runs are merged, so a shard that is
    one box comes back as one part; a shard with no elements has no parts.

    >>> local_parts((8,), [DimSplit(0, mesh_size=2, coord=1, split_factor=2)])
    ((4,), [LocalPart(box=Box(offsets=(2,), sizes=(2,)), local=Box(offsets=(0,), sizes=(2,))), \
LocalPart(box=Box(offsets=(6,), sizes=(2,)), local=Box(offsets=(2,), sizes=(2,)))])
    """
    runs = dim_runs(shape, splits)
    local_shape = tuple(sum(n for _, n in r) for r in runs)
    if any(n == 0 for n in local_shape):
        return local_shape, []
    per_dim: list[list[tuple[Run, int]]] = []
    for r in runs:
        starts, pos = [], 0
        for run in r:
            starts.append((run, pos))
            pos += run[1]
        per_dim.append(starts)
    parts = []
    for combo in itertools.product(*per_dim):
        box = Box(tuple(run[0] for run, _ in combo), tuple(run[1] for run, _ in combo))
        parts.append(LocalPart(box, Box(tuple(pos for _, pos in combo), box.sizes)))
    return local_shape, parts
