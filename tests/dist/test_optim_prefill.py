"""A fresh optimizer loaded through ModelOptimizerState (or an optimizer routed with its model) gets
its state from the checkpoint's layout: no initializing optimizer step runs (torch's helpers would
run one over zero gradients), the state comes back bit for bit, FSDP2 moments as DTensors at
another world size, and a failed load leaves the optimizer with no state rather than with
uninitialized tensors (optim_prefill.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shardckpt
from tests.dist.harness import run_ranks
from tests.dist.test_fsdp import _model, _sharded

pytestmark = pytest.mark.timeout(180)


def _counting_steps(opt: torch.optim.Optimizer) -> list[int]:
    """Counts calls of ``opt.step`` (torch's initializing step calls it too)."""
    calls: list[int] = []
    step = opt.step

    def counted(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    opt.step = counted  # type: ignore[method-assign]
    return calls


def _trained(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 13, generator=g)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def _state_of(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, (p, st) in enumerate(opt.state.items()):
        for name, t in st.items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[f"{i}/{tuple(p.shape)}/{name}"] = full.detach().clone()
    return out


def _plain(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _model()
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


@pytest.mark.parametrize("wrap", ["ModelOptimizerState", "routed"])
def test_a_fresh_optimizer_loads_without_an_initializing_step_and_bit_exactly(tmp_path, wrap):
    model, opt = _plain(0)
    _trained(model, opt)
    state = ({"train": shardckpt.ModelOptimizerState(model, opt)} if wrap == "ModelOptimizerState"
             else {"model": model, "optim": opt})
    shardckpt.save(state, tmp_path / "c")

    model2, opt2 = _plain(7)
    calls = _counting_steps(opt2)
    target = ({"train": shardckpt.ModelOptimizerState(model2, opt2)} if wrap == "ModelOptimizerState"
              else {"model": model2, "optim": opt2})
    shardckpt.load(target, tmp_path / "c")
    assert calls == []
    want, got = _state_of(opt), _state_of(opt2)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # Training goes on identically from both.
    _trained(model, opt, 1)
    _trained(model2, opt2, 1)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_failed_load_leaves_the_optimizer_without_state(tmp_path):
    model, opt = _plain(0)
    _trained(model, opt)
    shardckpt.save({"train": shardckpt.ModelOptimizerState(model, opt)}, tmp_path / "c")
    model2, opt2 = _plain(7)
    target = {"train": shardckpt.ModelOptimizerState(model2, opt2), "extra": torch.zeros(3)}
    with pytest.raises(shardckpt.MissingKeysError, match="extra"):
        shardckpt.load(target, tmp_path / "c")
    assert not opt2.state


def test_a_state_of_another_layout_falls_back_to_torchs_initializing_step(tmp_path):
    # Adafactor's factored second moments are not shaped like their parameters.
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    opt = torch.optim.Adafactor(model.parameters(), lr=0.01)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    shardckpt.save({"train": shardckpt.ModelOptimizerState(model, opt)}, tmp_path / "c")
    model2 = nn.Linear(16, 8)
    opt2 = torch.optim.Adafactor(model2.parameters(), lr=0.01)
    calls = _counting_steps(opt2)
    shardckpt.load({"train": shardckpt.ModelOptimizerState(model2, opt2)}, tmp_path / "c")
    assert calls == [1]
    want, got = _state_of(opt), _state_of(opt2)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def save_worker(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    model, opt = _sharded(world_size, 0)
    _trained(model, opt)
    shardckpt.save({"train": shardckpt.ModelOptimizerState(model, opt)}, path)
    state = _state_of(opt)  # full_tensor: a collective, on every rank
    return state if rank == 0 else {}


def load_worker(rank: int, world_size: int, path: str) -> dict[str, object]:
    from torch.distributed.tensor import DTensor

    model, opt = _sharded(world_size, 7)
    calls = _counting_steps(opt)
    shardckpt.load({"train": shardckpt.ModelOptimizerState(model, opt)}, path)
    moments = [t for st in opt.state.values() for k, t in st.items() if k != "step"]
    assert moments and all(isinstance(t, DTensor) for t in moments)
    state = _state_of(opt)
    _trained(model, opt, 1)  # the loaded state trains
    return {"calls": len(calls), "state": state if rank == 0 else {}}


def test_fsdp2_moments_prefilled_as_dtensors_at_another_world_size(tmp_path):
    path = str(tmp_path / "ckpt")
    want = run_ranks(2, save_worker, path)[0]
    results = run_ranks(3, load_worker, path)
    assert [r["calls"] for r in results] == [1, 1, 1]  # the training step above, no initializing one
    got = results[0]["state"]
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
