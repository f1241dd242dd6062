"""Where a tensor's local data sits in its global tensor: DTensor placements to boxes.

``Shard``, ``Replicate`` and ``_StridedShard`` (what FSDP2 ``fully_shard`` produces over tensor
parallel on a 2-D mesh) are supported; the index math is in ``planning/shards.py``. A local shard
is one box or, for strided shards that no later placement completes, several boxes, each mapped to
its own slice of the local tensor: nothing is gathered or redistributed.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

from shardckpt.errors import StateMismatchError
from shardckpt.planning.boxes import Box
from shardckpt.planning.shards import DimSplit, LocalPart, local_parts


def local_layout(tensor: torch.Tensor, key: str, rank: int) -> tuple[tuple[int, ...], list[LocalPart], torch.Tensor]:
    """(global shape, the parts of the local data in global coordinates, local tensor).

    A plain tensor is its own global tensor: one part. A DTensor's parts come from its mesh
    coordinate and placements; a shard with no elements has no parts. Partial sums and unknown
    placements are refused with a clear error rather than saved wrongly.
    """
    if not isinstance(tensor, DTensor):
        shape = tuple(tensor.shape)
        full = Box.full(shape)
        return shape, [LocalPart(full, full)] if full.volume else [], tensor
    shape = tuple(tensor.shape)
    local = tensor.to_local()
    mesh = tensor.device_mesh
    coord = mesh.get_coordinate()
    splits: list[DimSplit] = []
    for mesh_dim, p in enumerate(tensor.placements):
        if isinstance(p, Partial):
            raise StateMismatchError(
                f"tensor {key!r} on rank {rank} has a Partial placement; redistribute it to Shard or "
                "Replicate before saving"
            )
        at = coord[mesh_dim] if coord is not None else 0
        if isinstance(p, _StridedShard):
            factor = p.split_factor
            if not isinstance(factor, int):
                raise StateMismatchError(f"tensor {key!r} on rank {rank} has a symbolic split factor in {p!r}")
            splits.append(DimSplit(p.dim, mesh.size(mesh_dim), at, factor))
        elif type(p) is Shard:
            splits.append(DimSplit(p.dim, mesh.size(mesh_dim), at))
        elif type(p) is not Replicate:
            raise StateMismatchError(
                f"tensor {key!r} on rank {rank} has placement {p!r}, which shardckpt does not support yet"
            )
    if coord is None:  # this rank is outside the mesh: it holds nothing
        if local.numel():
            raise StateMismatchError(f"tensor {key!r}: rank {rank} is outside its mesh but holds {local.numel()} elements")
        return shape, [], local
    try:
        local_shape, parts = _parts(shape, tuple(splits))
    except ValueError as e:  # a placement past the last dimension: a broken DTensor
        raise StateMismatchError(f"tensor {key!r} on rank {rank}: placements {tensor.placements} do not fit: {e}") from e
    if tuple(local.shape) != local_shape:
        raise StateMismatchError(
            f"tensor {key!r} on rank {rank}: local shape {tuple(local.shape)} does not match its placement "
            f"{tensor.placements} (expected {local_shape})"
        )
    return shape, parts, local


@functools.lru_cache(maxsize=4096)
def _parts(shape: tuple[int, ...], splits: tuple[DimSplit, ...]) -> tuple[tuple[int, ...], list[LocalPart]]:
    """``local_parts``, remembered: a job saves the same layouts over and over, and the index math
    is a third of flattening a DTensor. Callers only read the (frozen) parts."""
    return local_parts(shape, list(splits))


def local_pieces(
    tensor: torch.Tensor, key: str, rank: int
) -> tuple[tuple[int, ...], list[tuple[Box, torch.Tensor]], torch.Tensor]:
    """(global shape, each box of the local data with the view of the local tensor holding it,
    local tensor): what save writes. A strided shard that no later placement completes (a
    row-parallel weight flattened by ``view``, which DTensor turns into ``_StridedShard``) holds
    several boxes; each is saved from its own view, as if another rank held it."""
    shape, parts, local = local_layout(tensor, key, rank)
    if not parts:  # no elements: a zero-volume box, which planning skips
        sizes = tuple(local.shape) if local.dim() == len(shape) else (0,) * len(shape)
        return shape, [(Box((0,) * len(shape), sizes), local)], local
    whole = Box.full(tuple(local.shape))
    return shape, [(p.box, local if p.local == whole else local[p.local.slices_within(whole)]) for p in parts], local


def local_view(tensor: torch.Tensor, key: str, rank: int) -> tuple[tuple[int, ...], Box, torch.Tensor]:
    """(global shape, box of the local data in global coordinates, local tensor), for a local
    shard that is one box (every layout FSDP2, TP and their 2-D combinations produce).

    A shard with several boxes (a strided shard that no later placement completes) is refused:
    use ``local_pieces`` for those.
    """
    shape, parts, local = local_layout(tensor, key, rank)
    if len(parts) > 1:
        raise StateMismatchError(
            f"tensor {key!r} on rank {rank}: its placements {getattr(tensor, 'placements', None)} leave this "
            f"rank {len(parts)} separate boxes of the global tensor, which save does not support yet; "
            "redistribute it to Shard/Replicate placements first"
        )
    if not parts:  # no elements: a zero-volume box, which planning skips
        sizes = tuple(local.shape) if local.dim() == len(shape) else (0,) * len(shape)
        return shape, Box((0,) * len(shape), sizes), local
    return shape, parts[0].box, local

