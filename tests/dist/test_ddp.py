"""DDP and plain models with their optimizers, through ModelOptimizerState: replicated parameters
are written once, checked equal across ranks, and load on another world size bit-exactly."""

from __future__ import annotations

import torch
from torch import nn

import shardckpt
from tests.dist.harness import run_ranks


def _ddp(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(seed)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 3)))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _flat(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"p/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"o/{i}/{k}": v.clone() for k, v in st.items()})
    return out


def ddp_save(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    model, opt = _ddp(0)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        model(torch.randn(8, 12, generator=g)).pow(2).sum().backward()  # different data per rank
        opt.step()
        opt.zero_grad()
    shardckpt.save({"train": shardckpt.ModelOptimizerState(model, opt)}, path)
    return _flat(model, opt)


def ddp_load(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    model, opt = _ddp(7)
    shardckpt.load({"train": shardckpt.ModelOptimizerState(model, opt)}, path)
    return _flat(model, opt)


def test_ddp_model_and_optimizer_save_2_load_3(tmp_path):
    path = str(tmp_path / "ckpt")
    saved = run_ranks(2, ddp_save, path)
    index = shardckpt.read_index(path)
    # Replicated parameters and moments are written once, spread over both ranks' files.
    assert len(index.files) == 2 and all(t.rank is None for t in index.tensors)
    for got in run_ranks(3, ddp_load, path):
        assert sorted(got) == sorted(saved[0])
        for k, v in saved[0].items():
            assert torch.equal(got[k], v), k


def test_plain_model_and_fresh_optimizer_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(9, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        model(torch.randn(5, 9)).sum().backward()
        opt.step()
    shardckpt.save({"train": shardckpt.ModelOptimizerState(model, opt)}, tmp_path / "c")
    model2 = nn.Linear(9, 4)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.1)
    shardckpt.load({"train": shardckpt.ModelOptimizerState(model2, opt2)}, tmp_path / "c")
    assert torch.equal(model2.weight, model.weight)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.9
    b1 = opt.state_dict()["state"][0]["momentum_buffer"]
    b2 = opt2.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(b1, b2)
