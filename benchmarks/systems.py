"""The systems under comparison, each as save / async-save / load functions over the same state,
plus the hardware floors measured on the same bytes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

import shardckpt

Timed = dict[str, float]


def local_of(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def evict(path: Path) -> None:
    """Drop the files' pages from the page cache (they are clean after fsync), so loads read the
    disk: a restarting job does not find its checkpoint in memory."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# ---- floors -----------------------------------------------------------------------------------

def floor_copy(state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> Timed:
    t = time.perf_counter()
    for k, v in state.items():
        buffers[k].copy_(local_of(v), non_blocking=True)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return {"stall": time.perf_counter() - t}


def floor_write(state: dict[str, torch.Tensor], path: Path, rank: int) -> Timed:
    path.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    fd = os.open(path / f"raw-{rank}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for v in state.values():
        os.write(fd, local_of(v).detach().cpu().contiguous().view(torch.uint8).numpy())
    os.fsync(fd)
    os.close(fd)
    return {"save": time.perf_counter() - t}


def floor_read(state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], path: Path, rank: int) -> Timed:
    t = time.perf_counter()
    with open(path / f"raw-{rank}.bin", "rb", buffering=0) as f:
        for k in state:
            f.readinto(buffers[k].view(-1).view(torch.uint8).numpy())
    return {"load": time.perf_counter() - t}


# ---- systems ----------------------------------------------------------------------------------

def shardckpt_save(compression: str) -> Callable[[dict, Path], Timed]:
    def run(state: dict, path: Path) -> Timed:
        res = shardckpt.save(state, path, compression=compression)
        return {"save": res.total_seconds, "stall": res.total_seconds}
    return run


def shardckpt_async(compression: str) -> Callable[[dict, Path], Timed]:
    def run(state: dict, path: Path) -> Timed:
        t = time.perf_counter()
        handle = shardckpt.async_save(state, path, compression=compression)
        stall = time.perf_counter() - t
        handle.wait()
        return {"stall": stall, "save": time.perf_counter() - t}
    return run


def shardckpt_load(state: dict, path: Path) -> Timed:
    t = time.perf_counter()
    shardckpt.load(state, path)
    return {"load": time.perf_counter() - t}


def _dcp_writer(path: Path, zstd: bool) -> dcp.FileSystemWriter:
    ext = None
    if zstd:
        from torch.distributed.checkpoint._extension import ZStandard

        ext = [ZStandard()]
    return dcp.FileSystemWriter(str(path), _extensions=ext)


def dcp_save(zstd: bool) -> Callable[[dict, Path], Timed]:
    def run(state: dict, path: Path) -> Timed:
        t = time.perf_counter()
        dcp.save(state, storage_writer=_dcp_writer(path, zstd))
        return {"save": time.perf_counter() - t, "stall": time.perf_counter() - t}
    return run


def dcp_async(state: dict, path: Path) -> Timed:
    t = time.perf_counter()
    fut = dcp.async_save(state, storage_writer=_dcp_writer(path, False))
    stall = time.perf_counter() - t
    fut.result()
    return {"stall": stall, "save": time.perf_counter() - t}


def dcp_load(state: dict, path: Path) -> Timed:
    t = time.perf_counter()
    dcp.load(state, checkpoint_id=str(path))
    return {"load": time.perf_counter() - t}


def torch_save(state: dict, path: Path) -> Timed:
    path.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(path / f"rank{dist.get_rank()}.pt", "wb") as f:
        torch.save({k: local_of(v) for k, v in state.items()}, f)
        f.flush()
        os.fsync(f.fileno())
    return {"save": time.perf_counter() - t, "stall": time.perf_counter() - t}


def torch_load(state: dict, path: Path) -> Timed:
    t = time.perf_counter()
    loaded = torch.load(path / f"rank{dist.get_rank()}.pt", weights_only=True)
    for k, v in state.items():
        local_of(v).copy_(loaded[k])
    return {"load": time.perf_counter() - t}


SAVERS: dict[str, Callable[[dict, Path], Timed]] = {
    "shardckpt save zstd": shardckpt_save("zstd"),
    "shardckpt save none": shardckpt_save("none"),
    "shardckpt async zstd": shardckpt_async("zstd"),
    "shardckpt async none": shardckpt_async("none"),
    "dcp save": dcp_save(False),
    "dcp save zstd": dcp_save(True),
    "dcp async_save": dcp_async,
    "torch.save": torch_save,
}
LOADERS: dict[str, Callable[[dict, Path], Timed]] = {
    "shardckpt save zstd": shardckpt_load,
    "shardckpt save none": shardckpt_load,
    "dcp save": dcp_load,
    "dcp save zstd": dcp_load,
    "torch.save": torch_load,
}
RESHARDABLE = ["shardckpt save zstd", "shardckpt save none", "dcp save", "dcp save zstd"]
