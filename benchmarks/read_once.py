"""Reads at scale: a DDP-style replicated model loaded by N gloo ranks, with and without
``load(read_once=True)``. Counts the stored bytes each rank reads from storage (a counting wrapper
around the real local storage) and times the load (slowest rank, median over repeats).

    python3 benchmarks/read_once.py --ranks 8 --mb 128 --codec zstd --repeats 3
    python3 benchmarks/read_once.py --ranks 8 --mb 64 --s3      # a moto S3 server on 127.0.0.1

Local loads read cold: rank 0 evicts the checkpoint's pages before each load (posix_fadvise); the
ranks still share one page cache, so after the first reader the other ranks' reads are memory
copies. ``--s3`` stores the checkpoint in a moto server (its own process): every read is a real
ranged GET that the server must answer. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import systems
import torch
import torch.distributed as dist
from s3_bench import moto_server

import shardckpt
from shardckpt.format.schema import DATA_HEADER_BYTES
from shardckpt.storage.local import LocalStorage
from shardckpt.storage.s3 import S3Storage

COLS = 1024


def make_state(mb: int) -> dict[str, torch.Tensor]:
    """The same weights on every rank (a replica): 8 bf16 matrices and their fp32 Adam moments."""
    g = torch.Generator().manual_seed(0)
    rows = max(1, mb * (1 << 20) // (8 * COLS * (2 + 4 + 4)))
    state: dict[str, torch.Tensor] = {}
    for i in range(8):
        state[f"layer{i}.weight"] = (torch.randn(rows, COLS, generator=g) * 0.02).to(torch.bfloat16)
        state[f"layer{i}.exp_avg"] = torch.randn(rows, COLS, generator=g) * 1e-3
        state[f"layer{i}.exp_avg_sq"] = (torch.randn(rows, COLS, generator=g) * 1e-3).pow(2)
    return state


COUNT = [0]


def _count_reads(cls: type) -> None:
    """Count the stored block bytes that the real storage class reads (headers left out)."""
    real_range, real_into = cls.read_range, cls.read_into

    def read_range(self: object, name: str, offset: int, length: int) -> bytes:
        if offset >= DATA_HEADER_BYTES:
            COUNT[0] += length
        return real_range(self, name, offset, length)  # type: ignore[no-any-return]

    def read_into(self: object, name: str, offset: int, buf: memoryview) -> None:
        if offset >= DATA_HEADER_BYTES:
            COUNT[0] += len(buf)
        real_into(self, name, offset, buf)

    cls.read_range, cls.read_into = read_range, read_into  # type: ignore[attr-defined]


def worker(rank: int, world: int, args: argparse.Namespace, init: str, out: mp.Queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    _count_reads(S3Storage if args.s3 else LocalStorage)
    path = Path(args.dir) / "ckpt"
    where = args.s3 or str(path)
    state = make_state(args.mb)
    shardckpt.save(state, where, compression=args.codec)
    runs: dict[str, list[list[float]]] = {"normal": [], "read_once": []}
    for _ in range(args.repeats):
        for mode in ("normal", "read_once"):
            target = {k: torch.zeros_like(v) for k, v in state.items()}
            dist.barrier()
            if rank == 0 and not args.s3 and not args.warm:
                systems.evict(path)
            dist.barrier()
            COUNT[0] = 0
            t0 = time.perf_counter()
            shardckpt.load(target, where, read_once=mode == "read_once")
            seconds = time.perf_counter() - t0
            assert all(torch.equal(target[k], state[k]) for k in state)
            runs[mode].append([seconds, COUNT[0]])
    out.put((rank, runs))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--mb", type=int, default=128)
    p.add_argument("--codec", default="zstd", choices=["zstd", "none"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--s3", action="store_true", help="store the checkpoint in a moto S3 server")
    p.add_argument("--warm", action="store_true", help="local loads from the page cache (no eviction)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp, ExitStack() as stack:
        args.dir = tmp
        if args.s3:
            endpoint = stack.enter_context(moto_server())
            os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"})
            import boto3

            boto3.client("s3").create_bucket(Bucket="read-once")
            args.s3 = "s3://read-once/ckpt"
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        init = os.path.join(tmp, "init")
        procs = [ctx.Process(target=worker, args=(r, args.ranks, args, init, out)) for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        got = dict(out.get(timeout=1800) for _ in procs)
        for proc in procs:
            proc.join()
        index = shardckpt.read_index(args.s3 or os.path.join(tmp, "ckpt"))
        stored = sum(b.length for t in index.tensors for b in t.blocks)
    report: dict[str, object] = {
        "ranks": args.ranks, "mb": args.mb, "codec": args.codec,
        "storage": "s3 (moto)" if args.s3 else "local, warm" if args.warm else "local, cold",
        "stored_bytes": stored,
    }
    for mode in ("normal", "read_once"):
        slowest = [max(got[r][mode][i][0] for r in got) for i in range(args.repeats)]
        per_rank = [got[r][mode][0][1] for r in sorted(got)]
        report[mode] = {
            "load_s_median": round(statistics.median(slowest), 3),
            "load_s_runs": [round(s, 3) for s in slowest],
            "bytes_read_total": sum(per_rank),
            "bytes_read_per_rank": per_rank,
            "total_over_stored": round(sum(per_rank) / stored, 3),
        }
    normal, once = report["normal"], report["read_once"]
    assert isinstance(normal, dict) and isinstance(once, dict)
    report["speedup_read_once"] = round(normal["load_s_median"] / once["load_s_median"], 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
