"""Deterministic test states in several layouts, and bit-exact comparison helpers."""

from __future__ import annotations

import zlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

# key -> (shape, dtype)
SPECS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "plain_f32": ((3, 1000), torch.float32),
    "plain_bf16": ((257, 33), torch.bfloat16),
    "plain_i64": ((17,), torch.int64),
    "plain_bool": ((5, 3), torch.bool),
    "plain_scalar": ((), torch.float64),
    "plain_empty": ((0, 5), torch.float32),
    "plain_u8": ((40,), torch.uint8),
    "big": ((1500, 200), torch.float32),
    "dt_s0": ((13, 7), torch.float32),
    "dt_s1": ((6, 11), torch.bfloat16),
    "dt_rep": ((5, 5), torch.float16),
    "dt_tiny": ((2, 3), torch.float32),
    "dt_big": ((640, 96), torch.bfloat16),
    "mesh2d_ss": ((9, 10), torch.float32),
    "mesh2d_rs": ((7, 4), torch.int32),
}


def expected(key: str) -> torch.Tensor:
    shape, dtype = SPECS[key]
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype in (torch.int64, torch.int32, torch.uint8):
        return torch.randint(0, 200, shape, generator=g).to(dtype)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)


def place(key: str, value: torch.Tensor, world_size: int, variant: int) -> torch.Tensor:
    """Put ``value`` into a layout chosen by (key, variant) for this world size."""
    if not key.startswith(("dt_", "mesh2d")):
        return value
    if key.startswith("mesh2d") and world_size == 4:
        mesh = init_device_mesh("cpu", (2, 2))
        placements = [Shard(0), Shard(1)] if key == "mesh2d_ss" else [Replicate(), Shard(0)]
        if variant:
            placements = placements[::-1]
        return distribute_tensor(value, mesh, placements)
    mesh = init_device_mesh("cpu", (world_size,))
    options = {
        "dt_s0": [Shard(0), Shard(1)],
        "dt_s1": [Shard(1), Shard(0)],
        "dt_rep": [Replicate(), Shard(0)],
        "dt_tiny": [Shard(0), Replicate()],
        "dt_big": [Shard(0), Shard(1)],
        "mesh2d_ss": [Shard(1), Shard(0)],
        "mesh2d_rs": [Shard(0), Replicate()],
    }[key]
    return distribute_tensor(value, mesh, [options[variant % 2]])


def local_expected(key: str, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's data of ``target``, the matching slice of the expected global tensor)."""
    full = expected(key)
    if not isinstance(target, DTensor):
        return target, full
    from shardckpt.layout import local_view

    _, box, local = local_view(target, key, 0)
    return local, full[box.slices_within(type(box).full(tuple(full.shape)))] if box.sizes else full


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
