"""Save and load throughput on S3 (a moto server on 127.0.0.1) against the local disk, for the same
state, in one process.

    python3 benchmarks/s3_bench.py --mb 256 --repeats 3

moto runs as its own process (``python -m moto.server``), so the server does not share the
client's GIL; pass --endpoint to measure a real store instead (credentials from the AWS environment,
the bucket must exist). moto keeps objects in memory and parses every request in Python, so its
figures say what the client path costs and where the server bounds it, not what AWS S3 does.
Each figure is the median over --repeats. Loads from the local disk are warm (page cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import shardckpt


def make_state(mb: int, seed: int = 0) -> dict[str, object]:
    """Weights and two Adam moments in bf16-like fp32 (compressible in the high bytes), ``mb`` MB in all."""
    g = torch.Generator().manual_seed(seed)
    per = mb * (1 << 20) // 3 // 4
    rows = max(per // 1024, 1)
    return {name: torch.randn(rows, 1024, generator=g) * 0.02 for name in ("w", "m", "v")} | {"step": 1}


def zeros_like(state: dict[str, object]) -> dict[str, object]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}


@contextmanager
def moto_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def timed(fn: Callable[[], object], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="state size in MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--endpoint", help="an S3 endpoint to use instead of a local moto server")
    ap.add_argument("--bucket", default="shardckpt-bench")
    ap.add_argument("--dir", help="local directory for the disk runs (default: a temp dir)")
    args = ap.parse_args()

    state = make_state(args.mb)
    raw = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    local_root = Path(args.dir or tempfile.mkdtemp(prefix="s3bench-"))
    rows = []

    def bench(kind: str, location: Callable[[str], str]) -> None:
        for compression in ("none", "zstd"):
            path = location(compression)
            target = zeros_like(state)
            save = timed(lambda p=path, c=compression: shardckpt.save(state, p, compression=c), args.repeats)
            load = timed(lambda p=path, t=target: shardckpt.load(t, p), args.repeats)
            assert all(torch.equal(target[k], state[k]) for k in ("w", "m", "v"))  # type: ignore[arg-type]
            rows.append((kind, compression, save, load))
            print(f"{kind:<6} {compression:<5} save {save:.3f} s ({raw / 1e6 / save:.0f} MB/s)  "
                  f"load {load:.3f} s ({raw / 1e6 / load:.0f} MB/s)", flush=True)

    try:
        bench("local", lambda c: str(local_root / f"ckpt-{c}"))
        with (moto_server() if args.endpoint is None else _given(args.endpoint)) as endpoint:
            if args.endpoint is None:
                os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                                   "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"})
                import boto3

                boto3.client("s3").create_bucket(Bucket=args.bucket)
            run = uuid.uuid4().hex[:8]
            bench("s3", lambda c: f"s3://{args.bucket}/bench-{run}/ckpt-{c}")
    finally:
        if args.dir is None:
            shutil.rmtree(local_root, ignore_errors=True)

    print(f"\nstate: {raw / 1e6:.0f} MB raw (3 fp32 tensors), 1 process, median of {args.repeats}\n")
    print("| storage | compression | save s | save MB/s | load s | load MB/s |")
    print("|---|---|---|---|---|---|")
    for kind, compression, save, load in rows:
        print(f"| {kind} | {compression} | {save:.3f} | {raw / 1e6 / save:.0f} | {load:.3f} | {raw / 1e6 / load:.0f} |")


@contextmanager
def _given(endpoint: str) -> Iterator[str]:
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint


if __name__ == "__main__":
    main()
