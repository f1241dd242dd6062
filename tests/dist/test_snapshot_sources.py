"""A repeated async save of an unchanged FSDP2 model keeps its snapshot's sources and its replica
digests (snapshot.SourceViews): they must always show the current bytes, and be made anew when an
item changes."""

from __future__ import annotations

import pytest
import torch

import shardckpt
from tests.dist.harness import run_ranks
from tests.dist.test_fsdp import _full, _sharded

pytestmark = pytest.mark.timeout(300)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 13)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def _snapshot(mos: shardckpt.ModelOptimizerState) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return _full(*get_state_dict(mos.model, mos.optimizer))


def _reloaded(mos: shardckpt.ModelOptimizerState, path: str) -> dict[str, torch.Tensor]:
    """What ``path`` holds, loaded over a scrambled copy of the same state."""
    with torch.no_grad():
        for p in mos.model.parameters():
            p.to_local().fill_(-5.0)
        for st in mos.optimizer.state.values():
            for t in st.values():
                (t.to_local() if hasattr(t, "to_local") else t).fill_(-5.0)
    shardckpt.load({"train": mos}, path)
    return _snapshot(mos)


def kept_sources(rank: int, world: int, path: str) -> list[object]:
    import importlib

    async_save = importlib.import_module("shardckpt.async_save")  # the module, not the function

    model, opt = _sharded(world, seed=0)
    _train(model, opt)
    mos = shardckpt.ModelOptimizerState(model, opt)
    out: list[object] = []
    for name in ("a", "b"):  # a plans; b reuses the plan and keeps the sources
        shardckpt.async_save({"train": mos}, f"{path}/{name}").wait()
    views = next(iter(async_save._SAVERS.values())).views
    out.append(bool(views._sources))  # kept from save b

    _train(model, opt)  # in place: the kept views must show the new bytes
    want = _snapshot(mos)
    shardckpt.async_save({"train": mos}, f"{path}/c").wait()
    got = _reloaded(mos, f"{path}/c")
    out.append(all(torch.equal(got[k], want[k]) for k in want))

    moments = next(iter(opt.state.values()))
    moments["exp_avg"] = moments["exp_avg"] + 1.0  # rebound to a new tensor: its items are made anew
    want = _snapshot(mos)
    shardckpt.async_save({"train": mos}, f"{path}/d").wait()
    got = _reloaded(mos, f"{path}/d")
    out.append(all(torch.equal(got[k], want[k]) for k in want))

    if rank == 1:
        step = next(iter(opt.state.values()))["step"]
        step += 1  # in place: this rank's replica drifts, and its kept digest must see it
    try:
        shardckpt.async_save({"train": mos}, f"{path}/e").wait()
        out.append("ok")
    except shardckpt.CheckpointError as e:
        out.append(type(e).__name__)
    return out


def test_kept_sources_and_digests_show_the_current_bytes(tmp_path):
    first, second = run_ranks(2, kept_sources, str(tmp_path))
    assert first == [True, True, True, "ReplicaMismatchError"]
    assert second == [True, True, True, "RankFailedError"]
    assert not (tmp_path / "e" / "index.json").exists()
    for name in "abcd":
        assert shardckpt.verify(str(tmp_path / name)).tensors > 0


def let_go(rank: int, world: int, path: str) -> list[bool]:
    import gc
    import importlib
    import weakref

    async_save = importlib.import_module("shardckpt.async_save")  # the module, not the function
    model, opt = _sharded(world, seed=0)
    _train(model, opt)
    mos = shardckpt.ModelOptimizerState(model, opt)
    for name in ("a", "b"):
        shardckpt.async_save({"train": mos}, f"{path}/{name}").wait()
    views = next(iter(async_save._SAVERS.values())).views
    kept = bool(views._sources)
    shards = [weakref.ref(t) for st in opt.state.values() for t in st.values()]
    shards += [weakref.ref(p) for p in model.parameters()]
    del mos, model, opt  # the job lets go of its model (a rebuild after a restart)
    gc.collect()
    return [kept, not views._sources, all(ref() is None for ref in shards)]


def test_a_model_the_job_lets_go_of_is_not_kept_by_its_last_save(tmp_path):
    assert run_ranks(2, let_go, str(tmp_path)) == [[True, True, True]] * 2
