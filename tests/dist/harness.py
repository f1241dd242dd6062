"""Run a function on N real processes joined by a gloo process group (our own small helper).

Each worker returns a picklable result; a worker that raises has its traceback re-raised in the
test, and a run that outlives its timeout is killed and fails instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any


def _worker(rank: int, world_size: int, init_file: str, fn: Callable[..., Any], args: tuple[Any, ...], out: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes: torch's queue reducer would share tensor memory with a process that exits.
        out.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        out.put((rank, "error", traceback.format_exc()))


_CTX: Any = None


def _context() -> Any:
    """A forkserver that has imported torch and shardckpt once: each run then forks workers in
    milliseconds instead of paying the torch import per process (fork of the pytest process itself
    is unsafe once it has threads)."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed.tensor", "shardckpt", "tests.dist.states"])
    return _CTX


def run_ranks(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 180.0, dies: frozenset[int] = frozenset()
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results by rank.
    Ranks in ``dies`` are expected to kill themselves: their result is None."""
    ctx = _context()
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, out)) for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        try:
            for _ in range(world_size - len(dies)):
                rank, status, value = out.get(timeout=timeout)
                (results if status == "ok" else errors)[rank] = value
        except queue.Empty:
            raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(results) - set(errors))} hung") from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    if errors:
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"worker(s) failed:\n{detail}")
    for r in dies:
        assert procs[r].exitcode not in (0, None), f"rank {r} was expected to die but exited {procs[r].exitcode}"
    return [None if r in dies else pickle.loads(results[r]) for r in range(world_size)]
