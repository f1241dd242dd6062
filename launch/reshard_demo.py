"""Save an FSDP2 model + AdamW state from one torchrun job and load it into another of a different
size: ``torchrun --nproc_per_node=N launch/reshard_demo.py save DIR`` then ``... load DIR``."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import shardckpt


def build(world_size: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def fingerprint(model: nn.Module) -> float:
    return float(sum(p.detach().full_tensor().double().sum() for p in model.parameters()))


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build(world, seed=0 if mode == "save" else 1)
    if mode == "save":
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            model(torch.randn(16, 256, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        msd, osd = get_state_dict(model, opt)
        res = shardckpt.save({"model": msd, "optim": osd, "step": 2}, path)
        fp = fingerprint(model)
        if rank == 0:
            print(f"[save] {world} ranks: {res.bytes_raw / 1e6:.1f} MB raw -> {res.bytes_stored / 1e6:.1f} MB "
                  f"stored in {res.total_seconds:.2f}s; parameter fingerprint {fp:.6f}")
    else:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": 0}
        shardckpt.load(state, path)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        fp = fingerprint(model)
        if rank == 0:
            report = shardckpt.verify(path)
            print(f"[load] {world} ranks re-sharded step {state['step']}: parameter fingerprint {fp:.6f}; "
                  f"verify: {report.blocks} blocks OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
