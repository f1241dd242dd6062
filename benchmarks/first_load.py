"""A fresh process's first load against later loads of the same checkpoint, with page faults (issue 15).

    python3 benchmarks/first_load.py --save-ranks 4 --load-ranks 2 --loads 5

launch/train.py's transformer (--dim/--layers; 1024/8 is 1.13 GiB of fp32 weights and AdamW
moments), FSDP2 over gloo. It is saved once at --save-ranks into --root (default /dev/shm, as the
memory tier keeps it), then loaded --loads times at --load-ranks into a freshly built model and
optimizer, all in the same processes. For each load it prints rank 0's seconds and minor page faults
(getrusage). A restore after a node loss is always the first load of a fresh process.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

import torch  # noqa: E402

from tests.dist.harness import run_ranks  # noqa: E402


def _build(world: int, seed: int, dim: int, layers: int) -> tuple[object, torch.nn.Module, torch.optim.Optimizer]:
    import train
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    train.DIM, train.LAYERS = dim, layers
    torch.manual_seed(seed)
    model = train.TinyLM()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return train, model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def save_worker(rank: int, world: int, args: argparse.Namespace) -> int:
    import shardckpt

    torch.set_num_threads(1)
    train, model, opt = _build(world, 0, args.dim, args.layers)
    x = torch.randint(0, train.VOCAB, (1, 33))  # type: ignore[attr-defined]
    model(x[:, :-1]).sum().backward()
    opt.step()
    shardckpt.save({"train": shardckpt.ModelOptimizerState(model, opt)}, args.root, compression="none")
    return 0


def load_worker(rank: int, world: int, args: argparse.Namespace) -> list[tuple[float, int]]:
    import shardckpt

    torch.set_num_threads(1)
    out = []
    for _ in range(args.loads):
        _, model, opt = _build(world, 1, args.dim, args.layers)
        torch.distributed.barrier()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        shardckpt.load({"train": shardckpt.ModelOptimizerState(model, opt)}, args.root)
        out.append((time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-ranks", type=int, default=4)
    p.add_argument("--load-ranks", type=int, default=2)
    p.add_argument("--loads", type=int, default=5)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--root", default=f"/dev/shm/shardckpt-first-load-{time.time_ns()}")
    args = p.parse_args()
    try:
        run_ranks(args.save_ranks, save_worker, args)
        for i, (seconds, faults) in enumerate(run_ranks(args.load_ranks, load_worker, args)[0]):
            print(f"load {i + 1}: {seconds:.3f} s, {faults} minor page faults (rank 0)")
    finally:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
