"""Does compression ever make a save slower? shardckpt's default ("auto") against "zstd" (always)
and "none" (never), in one run, on the same state, ranks and disk (issue 11, item 2).

    python3 benchmarks/compression_bench.py --ranks 2 --mb-per-rank 256 --repeats 3 --throttle-mb-s 100

Two sinks:
  - **disk**: the local disk as it is (warm page cache, every save fsynced);
  - **throttled**: the same files, but each rank's writes drain at ``--throttle-mb-s`` (an honest
    sleep: every append waits until the bytes before it and its own would have drained at that
    rate), a disk-bound case where compression should pay.

State per rank: mixed-precision training state, DTensors sharded on dim 0: bf16 weights and fp32
Adam moments (``exp_avg``, ``exp_avg_sq``). Each figure is the median over repeats of the slowest
rank's save time (until durable and committed); a warm-up round (not counted) also teaches "auto"
each sink's speed, as a training job's first checkpoint would. ``stored/raw`` is the checkpoint's
bytes on storage over its raw bytes; ``auto chose`` is the share of raw bytes auto compressed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from spawn import run_workers

COLS = 2048
CODECS = ("auto", "zstd", "none")


def make_state(world: int, mb_per_rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 weights (2 bytes) + two fp32 moments (8 bytes) per parameter, ``mb_per_rank`` MB per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    layers = 8
    rows = max(world, mb_per_rank * world * (1 << 20) // (10 * COLS) // layers)
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        w = (torch.randn(rows, COLS, generator=g) * 0.02).to(torch.bfloat16)
        m = torch.randn(rows, COLS, generator=g) * 1e-3
        v = (torch.randn(rows, COLS, generator=g) * 1e-3).pow(2)
        for name, t in (("weight", w), ("exp_avg", m), ("exp_avg_sq", v)):
            state[f"layer{i}.{name}"] = distribute_tensor(t, mesh, [Shard(0)])
    return state


class ThrottledWriter:
    """A real data file behind a sink of ``rate`` bytes/s shared by all of this rank's writer threads.
    It also profiles itself: ``busy`` is the time its bytes needed at that rate, ``span`` the time
    from its first append to its last byte drained; busy / span < 1 means the sink sat idle,
    waiting for encoded blocks."""

    last: ThrottledWriter | None = None

    def __init__(self, inner: object, rate: float) -> None:
        self.inner, self.rate = inner, rate
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.first = 0.0
        self.busy = 0.0
        ThrottledWriter.last = self

    def append(self, data: bytes | memoryview) -> int:
        off = self.inner.append(data)  # type: ignore[attr-defined]
        with self._lock:
            now = time.perf_counter()
            if not self.first and len(data) > 64:  # the header is not a block
                self.first = now
            self._free_at = max(self._free_at, now) + len(data) / self.rate
            self.busy += len(data) / self.rate
            done = self._free_at
        time.sleep(max(0.0, done - time.perf_counter()))
        return off  # type: ignore[no-any-return]

    def finish(self) -> int:
        return self.inner.finish()  # type: ignore[attr-defined,no-any-return]

    def abort(self) -> None:
        self.inner.abort()  # type: ignore[attr-defined]


def _throttle(rate: float | None) -> None:
    from shardckpt.storage.local import LocalStorage

    real = LocalStorage.__dict__.get("_real_create") or LocalStorage.create
    LocalStorage._real_create = real  # type: ignore[attr-defined]
    if rate is None:
        LocalStorage.create = real  # type: ignore[method-assign]
    else:
        LocalStorage.create = lambda self, name: ThrottledWriter(real(self, name), rate)  # type: ignore[method-assign,assignment,return-value]


def worker(rank: int, world: int, args: argparse.Namespace, init: str, results: mp.Queue) -> None:
    import shardckpt
    from shardckpt.pipeline import adaptive

    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # as torchrun sets it: the ranks share this machine's cores
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    state = make_state(world, args.mb_per_rank)
    work = Path(args.work)
    runs: dict[str, list[float]] = {}
    sinks = {"disk": None, "throttled": args.throttle_mb_s * 1e6}
    for rep in range(1 + args.repeats):
        for sink, rate in sinks.items():
            _throttle(rate)
            for codec in CODECS:
                path = work / f"{sink}-{codec}"
                if rank == 0 and path.exists():
                    shutil.rmtree(path)
                dist.barrier()
                res = shardckpt.save(state, path, compression=codec)
                t = torch.tensor([res.total_seconds], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                name = f"{sink}|{codec}"
                if rep == 0:  # warm-up: first touch, thread start-up, and auto's first measurements
                    runs[f"{name}|first_s"] = [t.item()]
                    continue
                runs.setdefault(f"{name}|save_s", []).append(t.item())
                runs.setdefault(f"{name}|stored", []).append(res.bytes_stored / res.bytes_raw)
                idx = shardckpt.read_index(path)
                weights = [b for e in idx.tensors if e.key.endswith(".weight") for b in e.blocks]
                runs.setdefault(f"{name}|bf16", []).append(
                    sum(b.length for b in weights) / sum(b.raw_length for b in weights))
                tw = ThrottledWriter.last
                if rate is not None and tw is not None and tw._free_at > tw.first:
                    u = torch.tensor([tw.busy / (tw._free_at - tw.first)], dtype=torch.float64)
                    dist.all_reduce(u, op=dist.ReduceOp.MIN)
                    runs.setdefault(f"{name}|sink_busy", []).append(u.item())
                if codec == "auto":
                    comp = sum(b.raw_length for e in idx.tensors for b in e.blocks if b.codec != "raw")
                    runs.setdefault(f"{name}|chose", []).append(comp / res.bytes_raw)
        if rank == 0 and rep == args.repeats:
            for kind, bal in adaptive._registry.items():
                print(f"rank 0 estimates for {kind}: {bal.estimates}", flush=True)
    if rank == 0:
        results.put(runs)
    shardckpt.shutdown()
    dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    return run_workers(worker, args.ranks, args)  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--mb-per-rank", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--throttle-mb-s", type=float, default=100.0)
    ap.add_argument("--work", default=None, help="where checkpoints go (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        args.work = work
        print(f"load before: {os.getloadavg()}", flush=True)
        runs = run(args)
        print(f"load after: {os.getloadavg()}", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\n{args.ranks} ranks, {args.mb_per_rank} MB per rank (bf16 weights + fp32 Adam moments), "
          f"median of {args.repeats}; throttled sink {args.throttle_mb_s:g} MB/s per rank\n")
    print("| sink | codec | save s | vs none | vs zstd | stored/raw | bf16 weights stored/raw | auto chose | first save s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sink in ("disk", "throttled"):
        none, zstd = med[f"{sink}|none|save_s"], med[f"{sink}|zstd|save_s"]
        for codec in CODECS:
            s = med[f"{sink}|{codec}|save_s"]
            chose = f"{med[f'{sink}|auto|chose']:.2f}" if codec == "auto" else ""
            print(f"| {sink} | {codec} | {s:.3f} | {s / none:.2f}x | {s / zstd:.2f}x | "
                  f"{med[f'{sink}|{codec}|stored']:.3f} | {med[f'{sink}|{codec}|bf16']:.3f} | {chose} | "
                  f"{med[f'{sink}|{codec}|first_s']:.3f} |")
    busy = {c: med.get(f"throttled|{c}|sink_busy") for c in CODECS}
    print("\nthrottled sink busy share (lowest rank; 1.0 = never waited for the encoder):",
          {c: None if v is None else round(v, 3) for c, v in busy.items()})
    print("\nall runs:", {k: [round(x, 3) for x in v] for k, v in runs.items()})


if __name__ == "__main__":
    main()
