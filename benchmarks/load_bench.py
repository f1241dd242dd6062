"""Load-only benchmark: shardckpt (none, zstd) vs DCP, warm and cold page cache, at the saving
world size and re-sharded, on the same state as bench.py (issue 11, item 5).

    python3 benchmarks/load_bench.py --ranks 2 --reshard-to 3 --mb-per-rank 128 --dtype fp32 --repeats 5

Each figure is the median over repeats of the slowest rank's load time; the ratio column divides
it by DCP's figure for the same case. Loads alternate between systems inside each repeat, so a
busy machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

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
    for rep in range(args.warmup + args.repeats):
        for cache in ("warm", "cold"):
            for name, load in LOADERS.items():
                path = work / name.replace(" ", "_")
                if cache == "cold":
                    systems.evict(path)
                else:
                    load(target, path)  # brings the pages in
                dist.barrier()
                seconds = _slowest(load(target, path)["load"])
                key = "layer3.exp_avg_sq"
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
    print("| case | seconds | / DCP |")
    print("|---|---|---|")
    for key, seconds in figures.items():
        dcp_key = key.rsplit(": ", 1)[0] + ": dcp"
        print(f"| {key} | {seconds:.3f} | {seconds / figures[dcp_key]:.2f}x |")


if __name__ == "__main__":
    main()
