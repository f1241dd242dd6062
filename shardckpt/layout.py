"""Where a tensor's local data sits in its global tensor: DTensor placements to boxes."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard

from shardckpt.errors import StateMismatchError
from shardckpt.planning.boxes import Box


def local_view(tensor: torch.Tensor, key: str, rank: int) -> tuple[tuple[int, ...], Box, torch.Tensor]:
    """(global shape, box of the local data in global coordinates, local tensor).

    A plain tensor is its own global tensor. A DTensor's box comes from its mesh and placements;
    layouts whose local data is not one box (Partial sums, strided shards) are refused with a clear
    error rather than saved wrongly.
    """
    if not isinstance(tensor, DTensor):
        shape = tuple(tensor.shape)
        return shape, Box.full(shape), tensor
    for p in tensor.placements:
        if isinstance(p, Partial):
            raise StateMismatchError(
                f"tensor {key!r} on rank {rank} has a Partial placement; redistribute it to Shard or "
                "Replicate before saving"
            )
        if type(p) not in (Shard, Replicate):  # subclasses such as strided shards are not one box
            raise StateMismatchError(
                f"tensor {key!r} on rank {rank} has placement {p!r}, which shardckpt does not support yet"
            )
    shape = tuple(tensor.shape)
    local = tensor.to_local()
    local_shape, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(local.shape) != tuple(local_shape):
        raise StateMismatchError(
            f"tensor {key!r} on rank {rank}: local shape {tuple(local.shape)} does not match its placement "
            f"{tensor.placements} (expected {tuple(local_shape)})"
        )
    return shape, Box(tuple(offsets), tuple(local_shape)), local
