"""RNGState, ResumableSampler and the world-size rule for RNG streams."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import shardckpt
from tests.dist.harness import run_ranks


def _draw() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trip(tmp_path):
    shardckpt.seed_everything(5)
    _draw()
    shardckpt.save({"rng": shardckpt.RNGState()}, tmp_path / "c")
    want = [_draw() for _ in range(3)]
    shardckpt.seed_everything(99)
    rng = shardckpt.RNGState()
    shardckpt.load({"rng": rng}, tmp_path / "c")
    assert rng.restored is True
    assert [_draw() for _ in range(3)] == want


def rng_save(rank: int, world: int, path: str) -> None:
    shardckpt.seed_everything(100 + rank)
    shardckpt.save({"rng": shardckpt.RNGState(seed=7)}, path)


def rng_load(rank: int, world: int, path: str) -> tuple[bool, float]:
    rng = shardckpt.RNGState(seed=7)
    shardckpt.load({"rng": rng}, path)
    return bool(rng.restored), float(torch.rand(1))


def test_rng_world_growth_rule(tmp_path):
    path = str(tmp_path / "c")
    run_ranks(1, rng_save, path)
    (r0, x0), (r1, x1) = run_ranks(2, rng_load, path)
    shardckpt.seed_everything(100)
    assert r0 is True and x0 == float(torch.rand(1))  # rank 0 continues its own stream
    shardckpt.seed_everything(7 + 1)
    assert r1 is False and x1 == float(torch.rand(1))  # a new rank is seeded with seed + rank


def test_sampler_resumes_exactly_on_another_world_size(tmp_path):
    n = 100
    two = [shardckpt.ResumableSampler(n, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = []
    for _ in range(5):
        for s in two:
            seen += s.next_indices(4)
    shardckpt.save({"sampler": two[0]}, tmp_path / "s")
    three = [shardckpt.ResumableSampler(n, rank=r, world_size=3, seed=0) for r in range(3)]
    for s in three:
        shardckpt.load({"sampler": s}, tmp_path / "s")
    for _ in range(3):
        for s in three:
            seen += s.next_indices(4)
    assert len(seen) == 76 and len(set(seen)) == 76  # no sample twice within the epoch
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3 * 1_000_003)).tolist()
    assert sorted(seen) == sorted(order[:76])


def test_a_dataloader_over_the_sampler_resumes_at_the_next_unseen_batch(tmp_path):
    # Iterating the sampler (as a DataLoader does) moves its position; it used to stay at 0, so
    # a resume replayed the epoch from its start.
    data = list(range(50))

    def loader(sampler: shardckpt.ResumableSampler) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)

    sampler = shardckpt.ResumableSampler(50, seed=5)
    batches = iter(loader(sampler))
    for _ in range(3):
        next(batches)
    shardckpt.save({"sampler": sampler}, tmp_path / "s")
    rest = [b.tolist() for b in batches]  # the run that was not stopped: the epoch's other batches
    after = [b.tolist() for b in loader(sampler)]  # and the next epoch, in a new order
    resumed = shardckpt.ResumableSampler(50, seed=0)
    shardckpt.load({"sampler": resumed}, tmp_path / "s")
    assert [b.tolist() for b in loader(resumed)] == rest
    assert [b.tolist() for b in loader(resumed)] == after != rest
    assert resumed.state_dict() == sampler.state_dict() == {"epoch": 2, "position": 0, "seed": 5, "size": 50}


def test_model_optimizer_state_imports_torch_state_dict_before_the_first_save():
    """The first save's stall must not pay for importing torch.distributed.checkpoint (~90 ms on
    2 cores, measured in the demo: first stall 111 ms, later ones ~40 ms): the wrapper imports it
    when built, before the training loop. Checked in a fresh interpreter, where nothing else has."""
    import subprocess
    import sys

    code = ("import sys, torch, shardckpt\n"
            "name = 'torch.distributed.checkpoint.state_dict'\n"
            "before = name in sys.modules\n"
            "shardckpt.ModelOptimizerState(torch.nn.Linear(2, 2))\n"
            "print(before, name in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr


@pytest.mark.parametrize("form", ["wrapper", "objects"])
def test_a_save_before_the_first_step_changes_nothing_and_loads_in_either_form(tmp_path, form):
    # torch's get_state_dict gives a stepless optimizer its state with a zero-lr step (AdamW's
    # step 1, empty moments): through ModelOptimizerState a save did that, and the run diverged.
    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6, generator=g)).square().sum().backward()
            opt.step()
        return model.weight.detach().clone()

    untouched = train(*fresh())
    model, opt = fresh()
    state = ({"train": shardckpt.ModelOptimizerState(model, opt)} if form == "wrapper"
             else {"train": {"model": model, "optim": opt}})
    shardckpt.save(state, tmp_path / "c")
    assert not opt.state  # the save gave the optimizer no state
    assert torch.equal(train(model, opt), untouched)
    for load_form in ("wrapper", "objects"):  # either form loads the step-0 checkpoint
        model, opt = fresh()
        target = ({"train": shardckpt.ModelOptimizerState(model, opt)} if load_form == "wrapper"
                  else {"train": {"model": model, "optim": opt}})
        shardckpt.load(target, tmp_path / "c")
        assert not opt.state and torch.equal(train(model, opt), untouched)
