"""Fixed overhead of a save (issue 11, item 4): what a repeated async save stalls beyond its copy,
and how planning and gathering grow with the number of ranks.

    python3 benchmarks/overhead.py stall --ranks 2 --mb-per-rank 5 --saves 30
    python3 benchmarks/overhead.py scale --ranks 2,4,8,16,32 --saves 10

``stall``: an FSDP-like state of DTensors (weights and two Adam moments over --tensors tensors, plus a
step value), saved with ``async_save`` --saves times into alternating directories. The copy floor is
the same local tensors copied into warm, preallocated buffers, one ``copy_`` each. Reports medians
over the saves after the first two, the slowest rank's, and the phases of ``SaveResult.phases``.
``--demo`` saves the training demo's model and AdamW through ``ModelOptimizerState`` instead.

``scale``: a tiny state (16 sharded tensors and 4 replicated ones per rank) at each world size;
reports the median per-save flatten, gather and plan time (the first save plans; later ones reuse
the plan) and the first save's planning time, the slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "launch"))

import torch
import torch.distributed as dist
from spawn import run_workers


def fsdp_like_state(world: int, mb_per_rank: float, tensors: int) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    per_tensor = max(1, int(mb_per_rank * world * (1 << 20) / 4 / tensors))
    cols = 256
    rows = max(world, per_tensor // cols)
    g = torch.Generator().manual_seed(0)
    state: dict[str, object] = {"step": 0}
    for i in range(tensors):
        state[f"t{i}"] = distribute_tensor(torch.randn(rows, cols, generator=g), mesh, [Shard(0)])
    return state


def demo_state() -> dict[str, object]:
    import train  # launch/train.py
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import shardckpt

    torch.manual_seed(0)
    model = train.TinyLM()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, train.VOCAB, (4, train.SEQ))).sum().backward()
    optim.step()
    return {"train": shardckpt.ModelOptimizerState(model, optim), "step": 0}


def _local_tensors(state: dict[str, object]) -> list[torch.Tensor]:
    from shardckpt.flatten import flatten_state

    tensors, _ = flatten_state(state, dist.get_rank())
    return [t.local for t in tensors]


def _slowest(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def stall_worker(rank: int, world: int, args: argparse.Namespace, init: str, results: object) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import shardckpt

    state = demo_state() if args.demo else fsdp_like_state(world, args.mb_per_rank, args.tensors)
    locals_ = _local_tensors(state)
    buffers = [torch.empty_like(t) for t in locals_]
    nbytes = sum(t.numel() * t.element_size() for t in locals_)
    floors, stalls, phases, reused = [], [], [], []
    for i in range(args.saves):
        state["step"] = i
        dist.barrier()
        t = time.perf_counter()
        for dst, src in zip(buffers, locals_):
            dst.copy_(src)
        floors.append(time.perf_counter() - t)
        dist.barrier()
        handle = shardckpt.async_save(state, f"{args.work}/ckpt-{i % 2}")
        stalls.append(handle.stall_seconds)
        result = handle.wait()
        phases.append(result.phases)
        reused.append(result.plan_reused)
    shardckpt.shutdown()
    skip = 2
    floors, stalls = _slowest(floors[skip:]), _slowest(stalls[skip:])
    names = ["flatten", "gather", "plan", "snapshot"]
    slow = _slowest([p.get(n, 0.0) for p in phases[skip:] for n in names])
    per_phase = {n: statistics.median(slow[j::len(names)]) for j, n in enumerate(names)}
    if rank == 0:
        floor, stall = statistics.median(floors), statistics.median(stalls)
        results.put({  # type: ignore[attr-defined]
            "ranks": world, "tensors_per_rank": len(locals_), "mb_per_rank": nbytes / 1e6,
            "floor_ms": floor * 1e3, "stall_ms": stall * 1e3,
            "stall_minus_floor_ms": (stall - floor) * 1e3,
            "goal_ms": (5e-3 + 1.2 * floor) * 1e3, "met": stall <= 5e-3 + 1.2 * floor,
            "stall_p90_ms": sorted(stalls)[int(0.9 * (len(stalls) - 1))] * 1e3,
            "phases_ms": {k: v * 1e3 for k, v in per_phase.items()},
            "plan_reused": sum(reused), "saves": len(reused),
        })
    dist.destroy_process_group()


def scale_worker(rank: int, world: int, args: argparse.Namespace, init: str, results: object) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import shardckpt

    state = fsdp_like_state(world, 0.01 * world, 16)
    for i in range(4):
        state[f"replica{i}"] = torch.full((8,), float(i))
    phases = []
    for i in range(args.saves):
        state["step"] = i
        result = shardckpt.save(state, f"{args.work}/scale-{world}-{i % 2}")
        phases.append(result.phases)
    names = ["flatten", "gather", "plan", "write", "commit"]
    slow = _slowest([p.get(n, 0.0) for p in phases for n in names])
    rows = [dict(zip(names, slow[k : k + len(names)])) for k in range(0, len(slow), len(names))]
    if rank == 0:
        later = rows[1:]
        results.put({  # type: ignore[attr-defined]
            "ranks": world,
            "first_plan_ms": rows[0]["plan"] * 1e3,
            "first_gather_ms": rows[0]["gather"] * 1e3,
            **{f"{n}_ms": statistics.median(r[n] for r in later) * 1e3 for n in names},
        })
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["stall", "scale"])
    parser.add_argument("--ranks", default="2")
    parser.add_argument("--mb-per-rank", type=float, default=5.0)
    parser.add_argument("--tensors", type=int, default=48, help="stall: tensors in the state (all ranks)")
    parser.add_argument("--demo", action="store_true", help="stall: the training demo's ModelOptimizerState")
    parser.add_argument("--saves", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="shardckpt-overhead-") as work:
        args.work = work
        for world in (int(r) for r in args.ranks.split(",")):
            worker = stall_worker if args.what == "stall" else scale_worker
            row = run_workers(worker, world, args)
            print(json.dumps(row))
            rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
