"""Race soak: ranks save asynchronously through CheckpointManager in a tight loop, with retention on
and busy processes loading every core, then every listed step is verified and loaded bit-exactly.

    python3 benchmarks/race_soak.py --ranks 2 --saves 100 --keep-last 1 --repeats 3 --busy 2

Prints one line per repeat and a total; exits 1 when any save failed, any listed step fails verify
or loads other values than the step it claims, or a run left no step. docs/reliability.md has the
figures. (tests/dist/test_soak.py runs a bounded version.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROWS, COLS = 256, 256


def expected(step: int) -> dict[str, object]:
    """The full state saved at ``step``: a pattern that differs in every element and every step."""
    import torch

    base = torch.arange(ROWS * COLS, dtype=torch.float32).view(ROWS, COLS)
    return {"w": base + step, "b": torch.full((COLS,), float(step)).to(torch.bfloat16), "step": step}


def _rank(rank: int, world: int, init: str, root: str, saves: int, keep_last: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import shardckpt

    mesh = init_device_mesh("cpu", (world,))
    first = expected(0)
    state = {"w": distribute_tensor(first["w"], mesh, [Shard(0)]), "b": first["b"].clone(), "step": 0}
    manager = shardckpt.CheckpointManager(root, keep_last=keep_last or None)
    failures: list[str] = []
    for step in range(1, saves + 1):
        want = expected(step)
        state["w"].to_local().copy_(distribute_tensor(want["w"], mesh, [Shard(0)]).to_local())  # type: ignore[union-attr]
        state["b"].copy_(want["b"])  # type: ignore[union-attr]
        state["step"] = step
        try:
            manager.save(step, state)
        except shardckpt.CheckpointError as e:
            failures.append(f"step {step}: {type(e).__name__}: {e}")
    try:
        manager.close()
    except shardckpt.CheckpointError as e:
        failures.append(f"close: {type(e).__name__}: {e}")
    shardckpt.shutdown()
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(failures))


def _busy(stop: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    while not stop.is_set():
        sum(range(20000))


def check_root(root: Path) -> tuple[list[int], list[str]]:
    """Verify and load every committed step under ``root``; the problems found, by step."""
    import torch

    import shardckpt

    # Listed by hand (not committed_steps) so that the script also measures older shardckpt versions.
    steps = sorted(int(d.name[5:]) for d in root.glob("step-*") if (d / "index.json").is_file()) if root.is_dir() else []
    problems = []
    for step in steps:
        path = root / f"step-{step:08d}"
        try:
            report = shardckpt.verify(path)
            if report.orphans:
                problems.append(f"step {step}: orphaned files {report.orphans}")
            got = {"w": torch.zeros(ROWS, COLS), "b": torch.zeros(COLS, dtype=torch.bfloat16), "step": -1}
            shardckpt.load(got, path)
            want = expected(step)
            if got["step"] != step or not torch.equal(got["w"], want["w"]) or not torch.equal(got["b"], want["b"]):  # type: ignore[arg-type]
                problems.append(f"step {step}: loads other values than step {step}")
        except shardckpt.CheckpointError as e:
            problems.append(f"step {step}: {type(e).__name__}: {e}")
    return steps, problems


def soak(ranks: int, saves: int, keep_last: int, busy: int) -> dict[str, object]:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    hogs = [ctx.Process(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
    for h in hogs:
        h.start()
    tmp = Path(tempfile.mkdtemp(prefix="race-soak-"))
    root, init = tmp / "root", tmp / "init"
    t0 = time.perf_counter()
    try:
        procs = [ctx.Process(target=_rank, args=(r, ranks, str(init), str(root), saves, keep_last, str(tmp / f"r{r}.json")))
                 for r in range(ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
            if p.is_alive():
                p.kill()
        failed: list[str] = []
        for r, p in enumerate(procs):
            out = tmp / f"r{r}.json"
            failed += json.loads(out.read_text()) if out.exists() else [f"rank {r} exited {p.exitcode} without a result"]
        steps, problems = check_root(root)
    finally:
        stop.set()
        for h in hogs:
            h.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"saves": saves, "failed_saves": failed, "listed": len(steps), "problems": problems,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--saves", type=int, default=100)
    ap.add_argument("--keep-last", type=int, default=1, help="0 keeps every step")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy-loop processes beside the job")
    args = ap.parse_args()
    total_failed = total_problems = total_saves = 0
    for i in range(args.repeats):
        r = soak(args.ranks, args.saves, args.keep_last, args.busy)
        failed, problems = r["failed_saves"], r["problems"]
        assert isinstance(failed, list) and isinstance(problems, list)
        total_saves += args.saves
        total_failed += len(failed)
        total_problems += len(problems) + (r["listed"] == 0)
        print(f"race soak {i + 1}/{args.repeats}: {args.ranks} ranks, {args.saves} async saves, keep_last="
              f"{args.keep_last or None}, {args.busy} busy: {len(failed)} failed saves, {r['listed']} steps listed, "
              f"{len(problems)} fail verify/load ({r['seconds']} s)", flush=True)
        for line in (failed + problems)[:5]:
            print(f"  {line}", flush=True)
    print(f"race soak total: {total_saves} saves, {total_failed} failed saves, {total_problems} broken listed steps")
    return 1 if total_failed or total_problems else 0


if __name__ == "__main__":
    sys.exit(main())
