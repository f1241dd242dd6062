"""Crash soak: a manager job at N ranks is SIGKILLed at random moments and restarted, again and again.

    python3 benchmarks/crash_soak.py --ranks 2 --kills 100 --keep-last 2
    python3 benchmarks/crash_soak.py --ranks 3 --kills 100 --keep-last 2

Each round starts N rank processes (env:// rendezvous, as torchrun would), which restore from the
latest complete step, check that the restored state is bit-exactly the one saved at that step,
and save asynchronously every step until, at a random moment, the soak SIGKILLs one rank or all of
them (a node loss). The survivors must exit with an error, not hang. Then every committed step is
verified and loaded, and the next round must resume from the newest one. Exits 1 on any broken
committed step, wrong resume or hang. docs/reliability.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from race_soak import check_root, expected


def worker(root: str, keep_last: int) -> int:
    import datetime

    import torch
    import torch.distributed as dist

    import shardckpt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    first = expected(0)
    state = {"w": distribute_tensor(torch.zeros_like(first["w"]), mesh, [Shard(0)]),  # type: ignore[arg-type]
             "b": torch.zeros_like(first["b"]), "step": -1}  # type: ignore[arg-type]
    manager = shardckpt.CheckpointManager(root, keep_last=keep_last or None)
    try:
        resumed = manager.restore(state) or 0
        if resumed:
            want = expected(resumed)
            local = distribute_tensor(want["w"], mesh, [Shard(0)]).to_local()  # type: ignore[arg-type]
            same = (state["step"] == resumed and torch.equal(state["w"].to_local(), local)  # type: ignore[union-attr]
                    and torch.equal(state["b"], want["b"]))  # type: ignore[arg-type]
            if not same:
                print(f"RESUME-MISMATCH at step {resumed}", flush=True)
                return 2
        print(f"resumed {resumed}", flush=True)
        for step in range(resumed + 1, resumed + 10_000):
            want = expected(step)
            state["w"].to_local().copy_(distribute_tensor(want["w"], mesh, [Shard(0)]).to_local())  # type: ignore[union-attr, arg-type]
            state["b"].copy_(want["b"])  # type: ignore[union-attr, arg-type]
            state["step"] = step
            manager.save(step, state)
    except shardckpt.CheckpointError as e:
        print(f"error {type(e).__name__}: {str(e)[:300]}", flush=True)
        return 3
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(ranks: int, root: Path, keep_last: int) -> list[subprocess.Popen[str]]:
    port = _free_port()
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(root), "--keep-last", str(keep_last)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    return procs


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0].strip() if got else ""


def soak(ranks: int, kills: int, keep_last: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="crash-soak-"))
    root = tmp / "root"
    counts = {"kills": 0, "broken_steps": 0, "wrong_resumes": 0, "hangs": 0, "max_listed": 0, "last_step": 0}
    try:
        for round_ in range(kills):
            steps, problems = check_root(root)
            counts["broken_steps"] += len(problems)
            for p in problems:
                print(f"  round {round_}: {p}", flush=True)
            want = steps[-1] if steps else 0
            procs = _start(ranks, root, keep_last)
            line = _first_line(procs[0], 120)
            if line != f"resumed {want}":
                counts["wrong_resumes"] += 1
                print(f"  round {round_}: expected 'resumed {want}', rank 0 said {line!r}", flush=True)
            time.sleep(rng.uniform(0.05, 2.0))
            victims = list(range(ranks)) if rng.random() < 0.5 else [rng.randrange(ranks)]
            for v in victims:
                procs[v].send_signal(signal.SIGKILL)
            counts["kills"] += 1
            deadline = time.monotonic() + 90
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    counts["hangs"] += 1
                    p.kill()
                    p.wait()
            if os.environ.get("SOAK_DEBUG"):
                waited = time.monotonic() - deadline + 90
                print(f"  round {round_}: killed {victims}, survivors out after {waited:.1f} s", flush=True)
            counts["max_listed"] = max(counts["max_listed"], len(steps))
            counts["last_step"] = want
            if (round_ + 1) % 10 == 0:
                print(f"  {round_ + 1} kills: {counts}", flush=True)
        steps, problems = check_root(root)
        counts["broken_steps"] += len(problems)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", metavar="ROOT", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--keep-last", type=int, default=2, help="0 keeps every step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.keep_last)
    t0 = time.perf_counter()
    c = soak(args.ranks, args.kills, args.keep_last, args.seed)
    print(f"crash soak: {args.ranks} ranks, keep_last={args.keep_last or None}, {c['kills']} kills in "
          f"{time.perf_counter() - t0:.0f} s: {c['broken_steps']} committed steps failed verify/load, "
          f"{c['wrong_resumes']} wrong resumes, {c['hangs']} hung ranks; reached step {c['last_step']}")
    return 1 if c["broken_steps"] or c["wrong_resumes"] or c["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
