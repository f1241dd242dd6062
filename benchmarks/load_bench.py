"""Load-only benchmark: shardckpt (none, zstd) vs DCP, warm and cold page cache, at the saving
world size and re-sharded, on the same state as bench.py (issue 11, item 5).

    python3 benchmarks/load_bench.py --ranks 2 --reshard-to 3 --mb-per-rank 128 --dtype fp32 --repeats 5

Each figure is the median over repeats of the slowest rank's load time; the ratio columns divide
it by DCP's figure and by the floor's for the same case. Loads alternate between systems inside
each repeat, so a busy machine slows all of them alike.

The floor ("raw read") is what any load of this checkpoint must do at least: every rank reads an
equal share of the checkpoint's data bytes (all files, in file order; the union is the whole
checkpoint, as it is for a re-sharded load) with large sequential reads into memory it has already
touched. No checksum, no decode, no copy into a target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import systems
import torch
import torch.distributed as dist
from bench import DTYPES, make_state
from spawn import run_workers

# "auto" is the default: it compresses a block only while the encoder keeps up with the disk.
SAVERS = {"shardckpt auto": systems.shardckpt_save("auto"), "shardckpt none": systems.shardckpt_save("none"),
          "shardckpt zstd": systems.shardckpt_save("zstd"), "dcp": systems.dcp_save(False)}
LOADERS = {name: systems.shardckpt_load for name in SAVERS if name.startswith("shardckpt")} | {"dcp": systems.dcp_load}


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


FLOOR = "raw read"  # the floor; it reads the files of "shardckpt none" (raw, the state's bytes)
FLOOR_READ_BYTES = 8 << 20


def _floor_share(path: Path, rank: int, world: int) -> list[tuple[Path, int, int]]:
    """This rank's equal share of the data files' bytes under ``path``, as (file, offset, length)."""
    files = sorted((path / "data").iterdir())
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    lo, hi = total * rank // world, total * (rank + 1) // world
    share, start = [], 0
    for f, size in zip(files, sizes):
        a, b = max(lo, start), min(hi, start + size)
        if a < b:
            share.append((f, a - start, b - a))
        start += size
    return share


def floor_load(path: Path, rank: int, world: int, buffer: np.ndarray) -> dict[str, float]:
    t = time.perf_counter()
    for f, offset, length in _floor_share(path, rank, world):
        fd = os.open(f, os.O_RDONLY)
        try:
            done = 0
            while done < length:
                view = memoryview(buffer)[: min(FLOOR_READ_BYTES, length - done)]  # type: ignore[arg-type]
                n = os.preadv(fd, [view], offset + done)
                if n <= 0:
                    raise OSError(f"{f}: short read at {offset + done}")
                done += n
        finally:
            os.close(fd)
    return {"load": time.perf_counter() - t}


def worker(rank: int, world: int, args: argparse.Namespace, phase: str, init: str, results: object) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    state = make_state(world, args.ranks, args.mb_per_rank, DTYPES[args.dtype])
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    work = Path(args.work)
    if phase == "save":
        for name, save in SAVERS.items():
            path = work / name.replace(" ", "_")
            if rank == 0 and path.exists():
                shutil.rmtree(path)
            dist.barrier()
            save(state, path)
            systems.fsync_tree(path)
            dist.barrier()
    case = "same world" if phase == "save" else f"re-sharded {args.ranks}->{world}"
    runs: dict[str, list[float]] = {}
    buffer = np.ones(FLOOR_READ_BYTES, dtype=np.uint8)  # touched: the floor reads into warm memory
    loaders = {**LOADERS, FLOOR: lambda _, path: floor_load(path, rank, world, buffer)}
    for rep in range(args.warmup + args.repeats):
        for cache in ("warm", "cold"):
            for name, load in loaders.items():
                path = work / ("shardckpt none" if name == FLOOR else name).replace(" ", "_")
                if cache == "cold":
                    systems.evict(path)
                else:
                    load(target, path)  # brings the pages in
                dist.barrier()
                seconds = _slowest(load(target, path)["load"])
                key = "layer3.exp_avg_sq"
                if name != FLOOR:
                    assert torch.equal(systems.local_of(target[key]), systems.local_of(state[key])), name
                if rep >= args.warmup:
                    runs.setdefault(f"{case}, {cache}: {name}", []).append(seconds)
    if rank == 0:
        results.put({k: statistics.median(v) for k, v in runs.items()})  # type: ignore[attr-defined]
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--reshard-to", type=int, default=3)
    p.add_argument("--mb-per-rank", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        args.work = tmp
        figures: dict[str, float] = {}
        figures.update(run_workers(worker, args.ranks, args, "save"))  # type: ignore[arg-type]
        figures.update(run_workers(worker, args.reshard_to, args, "reshard"))  # type: ignore[arg-type]
    print("| case | seconds | / DCP | / floor |")
    print("|---|---|---|---|")
    for key, seconds in figures.items():
        case = key.rsplit(": ", 1)[0]
        print(f"| {key} | {seconds:.3f} | {seconds / figures[case + ': dcp']:.2f}x | "
              f"{seconds / figures[case + ': ' + FLOOR]:.2f}x |")


if __name__ == "__main__":
    main()
