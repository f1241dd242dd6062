"""Run a benchmark worker on ``world`` fresh processes (spawned, joined by a file store) and return
what rank 0 puts on the queue; a worker that dies stops the others and the run."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
from collections.abc import Callable


def run_workers(worker: Callable[..., None], world: int, *args: object) -> object:
    """``worker(rank, world, *args, init_file, results_queue)`` on every rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "store")
        procs = [ctx.Process(target=worker, args=(r, world, *args, init, results)) for r in range(world)]
        for p in procs:
            p.start()
        out = None
        while out is None:
            try:
                out = results.get(timeout=2)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    for p in procs:
                        p.kill()
                    raise SystemExit(f"benchmark worker failed (exit codes {dead}); see its traceback above") from None
        for p in procs:
            p.join()
    return out
