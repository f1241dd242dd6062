"""The remembered get_state_dict answer (state_recipe.py) on FSDP2 and DDP models: it gives
torch's answer on every rank, and FSDP2's unsharded parameters (between a forward and its
backward) make it ask torch again, whose hook reshards them."""

from __future__ import annotations

import pytest
import torch

import shardckpt
from tests.dist.harness import run_ranks
from tests.dist.test_ddp import _ddp
from tests.dist.test_fsdp import _sharded
from tests.unit.test_state_recipe import _assert_torch_agrees, _flat

pytestmark = pytest.mark.timeout(300)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: int) -> None:
    model(torch.randn(4, inputs)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def agree_worker(rank: int, world: int, kind: str) -> list[bool]:
    if kind == "fsdp2":
        model, opt = _sharded(world, seed=0)
        inputs = 13
    else:
        model, opt = _ddp(seed=0)
        inputs = 12
    _train(model, opt, inputs)
    mos = shardckpt.ModelOptimizerState(model, opt)
    mos.state_dict_for_save()
    learned = mos._recipe is not None
    recipe = mos._recipe
    _train(model, opt, inputs)
    _assert_torch_agrees(mos)
    kept = mos._recipe is recipe
    from shardckpt.flatten import flatten_state

    first = {t.key: t for t in flatten_state({"train": mos}, rank)[0]}
    again = {t.key: t for t in flatten_state({"train": mos}, rank)[0]}
    reused = [k for k in first if again[k] is first[k]]
    assert reused == list(first), f"items made anew: {sorted(set(first) - set(reused))[:5]}"
    assert mos.leaves_for_save() is not None
    assert _flat({"train": mos}, rank) == _flat({"train": mos.state_dict_for_save()}, rank)  # as the walk
    if kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()  # what a save between a forward and its backward would find
        assert not isinstance(next(model.parameters()), torch.distributed.tensor.DTensor)
        assert mos.leaves_for_save() is None  # other parameter objects: torch is asked, and reshards
        sd = mos.state_dict_for_save()
        assert all(isinstance(t, torch.distributed.tensor.DTensor) for t in sd["model"].values())
        _assert_torch_agrees(mos)
    return [learned, kept]


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_the_recipe_gives_torchs_answer_on_every_rank(kind):
    assert run_ranks(2, agree_worker, kind) == [[True, True]] * 2
