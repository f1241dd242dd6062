"""FSDP2 (fully_shard) model + AdamW optimizer state saved at N ranks loads bit-exactly at M."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shardckpt
from tests.dist.harness import run_ranks


def _model() -> nn.Module:
    # Odd sizes give uneven shards (and empty ones at 4 ranks for the 3-row output layer).
    return nn.Sequential(nn.Linear(13, 27), nn.ReLU(), nn.Linear(27, 3))


def _sharded(world_size: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = _model()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _full(msd: dict, osd: dict) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t.clone()

    out = {f"model/{k}": full(v) for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        for name, t in st.items():
            out[f"optim/{fqn}/{name}"] = full(t)
    return out


def save_worker(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _sharded(world_size, seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        model(torch.randn(8, 13, generator=g)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    shardckpt.save({"model": msd, "optim": osd, "step": 3}, path)
    full = _full(msd, osd)  # collective: every rank takes part
    return full if rank == 0 else {}


def load_worker(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _sharded(world_size, seed=123)  # different initial values
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": 0}
    shardckpt.load(state, path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    assert state["step"] == 3
    msd2, osd2 = get_state_dict(model, opt)
    assert osd2["param_groups"][0]["weight_decay"] == 0.1
    full = _full(msd2, osd2)
    return full if rank == 0 else {}


@pytest.mark.parametrize(("n", "m"), [(2, 3), (4, 1), (3, 2), (1, 4)])
def test_fsdp2_adamw_reshard(tmp_path, n, m):
    path = str(tmp_path / "ckpt")
    want = run_ranks(n, save_worker, path)[0]
    got = run_ranks(m, load_worker, path)[0]
    assert sorted(got) == sorted(want)
    assert any("exp_avg_sq" in k for k in want)
    for k in want:
        assert torch.equal(got[k].view(-1).view(torch.uint8), want[k].view(-1).view(torch.uint8)), k
