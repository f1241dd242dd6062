"""nn.Module and Optimizer objects in a state go through torch's distributed state-dict helpers:
an FSDP2 model + AdamW saved as objects loads into fresh ones with DTensor moments, bit-exactly, and
training continues exactly; plain modules in one process too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shardckpt
from tests.dist.harness import run_ranks
from tests.dist.test_fsdp import _sharded  # the same uneven FSDP2 model and AdamW

pytestmark = pytest.mark.timeout(300)


def _step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    loss = model(torch.randn(8, 13, generator=g)).pow(2).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def _local_bits(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's shards of parameters and moments, as raw bytes, keyed by parameter name."""
    out = {}
    for name, p in model.named_parameters():
        out[f"param/{name}"] = p.to_local().detach().reshape(-1).view(torch.uint8).clone()
        for k, v in opt.state[p].items():
            out[f"{k}/{name}"] = (v.to_local() if hasattr(v, "to_local") else v).reshape(-1).view(torch.uint8).clone()
    return out


def save_worker(rank: int, world_size: int, path: str) -> dict[str, object]:
    model, opt = _sharded(world_size, seed=0)
    for i in range(3):
        _step(model, opt, i)
    shardckpt.save({"model": model, "optim": opt, "step": 3}, path)
    saved = _local_bits(model, opt)
    loss = _step(model, opt, 3)  # the run goes on: what a resume must reproduce
    return {"saved": saved, "loss": loss, "after": _local_bits(model, opt)}


def load_worker(rank: int, world_size: int, path: str) -> dict[str, object]:
    from torch.distributed.tensor import DTensor

    model, opt = _sharded(world_size, seed=123)  # other weights, and no optimizer state yet
    state: dict[str, object] = {"model": model, "optim": opt, "step": 0}
    shardckpt.load(state, path)
    assert state["step"] == 3
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor)
        for k in ("exp_avg", "exp_avg_sq"):
            moment = opt.state[p][k]
            assert isinstance(moment, DTensor), f"{k} of {name} is {type(moment).__name__}, not a DTensor"
            assert moment.placements == p.placements and moment.shape == p.shape
    loaded = _local_bits(model, opt)
    loss = _step(model, opt, 3)  # runs: no mixed Tensor/DTensor

    refused = None
    try:
        shardckpt.save({"optim": opt}, path + "-optim-only")
    except shardckpt.StateMismatchError as e:
        refused = str(e)
    return {"loaded": loaded, "loss": loss, "after": _local_bits(model, opt), "refused": refused}


def test_fsdp2_model_and_optimizer_objects_round_trip(tmp_path):
    path = str(tmp_path / "ckpt")
    saved = run_ranks(2, save_worker, path)
    loaded = run_ranks(2, load_worker, path)
    for rank in range(2):
        want, got = saved[rank], loaded[rank]
        assert sorted(got["loaded"]) == sorted(want["saved"]) and any("exp_avg_sq" in k for k in want["saved"])
        for k, bits in want["saved"].items():
            assert torch.equal(got["loaded"][k], bits), (rank, k)
        assert torch.equal(got["loss"].reshape(1).view(torch.uint8), want["loss"].reshape(1).view(torch.uint8))
        for k, bits in want["after"].items():
            assert torch.equal(got["after"][k], bits), (rank, k)
        assert got["refused"] is not None and "model is not in the state" in got["refused"]


def _plain(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def _plain_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    loss = model(torch.randn(4, 5, generator=g)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def test_plain_module_and_optimizer_objects_in_one_process(tmp_path):
    model, opt = _plain(0)
    for i in range(2):
        _plain_step(model, opt, i)
    shardckpt.save({"model": model, "optim": opt}, tmp_path / "c")
    keys = {t.key for t in shardckpt.read_index(tmp_path / "c").tensors}
    assert "optim/state/0.weight/exp_avg" in keys and "model/2.bias" in keys  # get_state_dict's layout
    want = _plain_step(model, opt, 2)

    model2, opt2 = _plain(9)
    shardckpt.load({"model": model2, "optim": opt2}, tmp_path / "c")
    assert torch.equal(_plain_step(model2, opt2, 2), want)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), model.parameters()))


def test_saving_an_optimizer_before_its_first_step_leaves_it_untouched(tmp_path):
    # torch's get_optimizer_state_dict creates missing state with a zero-lr step, which would
    # advance Adam's step count: a save must not change the run.
    model, opt = _plain(0)
    shardckpt.save({"model": model, "optim": opt}, tmp_path / "c")
    assert not opt.state and all(p.grad is None for p in model.parameters())
    want = [_plain_step(model, opt, i) for i in range(2)]

    model2, opt2 = _plain(3)
    _plain_step(model2, opt2, 7)  # has state of its own, which the checkpoint's (none) replaces
    shardckpt.load({"model": model2, "optim": opt2}, tmp_path / "c")
    assert not opt2.state
    got = [_plain_step(model2, opt2, i) for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
