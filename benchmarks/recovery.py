"""Recovery from a node loss, from the memory tier and from durable storage, in one run (issue 15).

    python3 benchmarks/recovery.py --dim 1024 --layers 8 --batch 1 --out runs/recovery

1. Recovery: launch/node_loss.py twice on the same model (two torchrun agents of 2 workers on
   127.0.0.1, one SIGKILLed, the survivor resumes at 2 ranks): once with the memory tier (every
   --memory-every steps) and once without. The durable checkpoints are evicted from the page cache
   at the loss (--cold), as a restarted node would find them. Reports the split of the time from
   the loss to the first step after the restore: detection and rendezvous, process group init,
   building the model, the load, the first step.
2. Throughput: the same two agents train --steps steps with no loss, with durable saves only and
   with durable saves plus the memory tier; reports steps/s in the training loop and the mean stall
   of each tier's saves (train.py's last line).

The model is launch/train.py's transformer at --dim/--layers: 1024/8 is 101 M parameters, 1.13 GiB
of fp32 weights and AdamW moments.

With --durable-s3 the durable tier of both recovery runs is an S3 bucket on a moto server this
script starts on 127.0.0.1 (an object store, as durable tiers of real clusters often are) instead
of the local disk; the throughput runs are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from node_loss import Node, free_port, wait_listening  # noqa: E402
from s3_bench import moto_server  # noqa: E402

BUCKET = "shardckpt-recovery"


def recovery(args: argparse.Namespace, memory: bool) -> dict[str, object]:
    out = Path(args.out) / ("loss-memory" if memory else "loss-durable")
    cmd = [sys.executable, str(ROOT / "launch" / "node_loss.py"), "--out", str(out), "--dim", str(args.dim),
           "--layers", str(args.layers), "--batch", str(args.batch), "--save-interval", str(args.save_interval),
           "--steps", "200", "--step-sleep", "0", "--cold", "--shrink-only", "--timeout", "900"]
    if memory:
        cmd += ["--memory-every", str(args.memory_every)]
    if args.durable_s3:
        cmd += ["--durable", f"s3://{BUCKET}/{out.name}-{time.time_ns()}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"node_loss.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip().splitlines()[-1], flush=True)
    return dict(json.loads((out / "summary.json").read_text())["shrink"])


def throughput(args: argparse.Namespace, memory: bool) -> dict[str, object]:
    out = Path(args.out) / ("train-memory" if memory else "train-durable")
    shutil.rmtree(out, ignore_errors=True)  # a checkpoint left by an earlier run would be resumed
    out.mkdir(parents=True)
    train = ["--ckpt", str(out / "ckpt"), "--steps", str(args.steps), "--save-interval", str(args.save_interval),
             "--dim", str(args.dim), "--layers", str(args.layers), "--batch", str(args.batch)]
    memory_root = Path(f"/dev/shm/shardckpt-recovery-bench-{time.time_ns()}")
    if memory:
        train += ["--memory-every", str(args.memory_every), "--memory-root", str(memory_root), "--memory-job", "job"]
    port = free_port()
    nodes = [Node("node0", out, port, train)]
    wait_listening(port, nodes[0])
    nodes.append(Node("node1", out, port, train))
    try:
        for n in nodes:
            if n.proc.wait(timeout=1800) != 0:
                raise SystemExit(f"{n.name} failed; see {n.log}")
    finally:
        for n in nodes:
            n.stop()
        subprocess.run(["rm", "-rf", str(memory_root)], check=False)
    line = next(ln for ln in nodes[0].text().splitlines() if ln.startswith("[train] steps"))
    print(line, flush=True)
    durable = re.search(r"([\d.]+) ms mean stall over (\d+) saves", line)
    mem = re.search(r"([\d.]+) ms over (\d+) memory-tier saves", line)
    rate = re.search(r"([\d.]+) steps/s in the loop", line)
    assert durable and rate, line
    return {"steps_per_s": float(rate.group(1)), "durable_stall_ms": float(durable.group(1)),
            "memory_stall_ms": float(mem.group(1)) if mem else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--save-interval", type=int, default=4)
    ap.add_argument("--memory-every", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="steps of each throughput run")
    ap.add_argument("--out", default="runs/recovery")
    ap.add_argument("--durable-s3", action="store_true",
                    help="durable tier on S3 (a moto server on 127.0.0.1); recovery runs only")
    args = ap.parse_args()
    with ExitStack() as stack:
        if args.durable_s3:
            endpoint = stack.enter_context(moto_server())
            os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"})
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
        result = {
            "durable_tier": "s3 (moto on 127.0.0.1)" if args.durable_s3 else "local disk, read cold",
            "recovery_memory": recovery(args, memory=True),
            "recovery_durable": recovery(args, memory=False),
        }
    mem, dur = result["recovery_memory"], result["recovery_durable"]
    result["load_speedup"] = float(dur["load_s"]) / float(mem["load_s"])  # type: ignore[arg-type, index]
    if not args.durable_s3:
        td = result["train_durable"] = throughput(args, memory=False)
        tm = result["train_memory"] = throughput(args, memory=True)
        result["memory_stall_over_durable"] = (
            float(tm["memory_stall_ms"]) / float(td["durable_stall_ms"]) if tm["memory_stall_ms"] else None  # type: ignore[arg-type]
        )
        result["throughput_memory_over_durable"] = float(tm["steps_per_s"]) / float(td["steps_per_s"])  # type: ignore[arg-type]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "recovery.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
