"""What async_save(lazy=True) covers: optimizer.step() waits for the copy; any other in-place write
to a saved tensor before the copy is complete fails the save (never a silently changed checkpoint);
handle.wait_snapshot() is how to make such writes safe."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import shardckpt

pytestmark = pytest.mark.timeout(120)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(64, 64)


def _later(event: threading.Event, seconds: float = 0.3) -> threading.Timer:
    timer = threading.Timer(seconds, event.set)
    timer.start()
    return timer


def test_optimizer_step_waits_and_the_save_commits_the_values_before_it(tmp_path, held_copy):
    copying, release = held_copy
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    handle = shardckpt.async_save({"model": model, "step": 1}, tmp_path / "c", lazy=True)
    assert copying.wait(30)
    model(torch.randn(4, 64)).sum().backward()  # forward and backward write no saved tensor
    timer = _later(release)
    opt.step()
    assert release.is_set(), "optimizer.step() ran before the lazy snapshot was complete"
    handle.wait()  # the step's own writes do not fail the save: they came after the copy
    timer.cancel()
    got = _model()
    with torch.no_grad():
        got.weight.zero_()
    shardckpt.load({"model": got}, tmp_path / "c")
    assert torch.equal(got.weight, want["weight"]) and torch.equal(got.bias, want["bias"])
    assert not torch.equal(model.weight, want["weight"])


@pytest.mark.parametrize("write", ["ema", "clip", "copy_"])
def test_another_in_place_write_before_the_copy_fails_the_save(tmp_path, held_copy, write):
    copying, release = held_copy
    model = _model()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {"model": model, "ema": ema, "step": 1}
    handle = shardckpt.async_save(state, tmp_path / "c", lazy=True)
    assert copying.wait(30)
    with torch.no_grad():
        if write == "ema":
            ema["weight"].mul_(0.9).add_(model.weight, alpha=0.1)
        elif write == "clip":
            model.weight.clamp_(-0.01, 0.01)
        else:
            model.bias.copy_(torch.ones(64))
    release.set()
    with pytest.raises(shardckpt.CheckpointError, match="changed in place while the snapshot was copying") as e:
        handle.wait()
    key = {"ema": "'ema/weight'", "clip": "'model/weight'", "copy_": "'model/bias'"}[write]
    assert key in str(e.value)
    assert isinstance(e.value.__cause__, shardckpt.StateMismatchError)
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.read_index(tmp_path / "c")  # nothing was committed
    shardckpt.async_save(state, tmp_path / "d").wait()  # the failure was seen: the next save runs


def test_a_forward_that_updates_batchnorm_statistics_is_a_write_too(tmp_path, held_copy):
    copying, release = held_copy
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    handle = shardckpt.async_save({"model": model}, tmp_path / "c", lazy=True)
    assert copying.wait(30)
    # Train mode: the kernel updates running_mean / running_var without counting it as a write,
    # but num_batches_tracked.add_(1) is counted.
    model(torch.randn(16, 8))
    release.set()
    with pytest.raises(shardckpt.CheckpointError, match="'model/1.num_batches_tracked'"):
        handle.wait()


def test_wait_snapshot_makes_later_writes_safe(tmp_path, held_copy):
    copying, release = held_copy
    model = _model()
    want = model.weight.detach().clone()
    handle = shardckpt.async_save({"model": model}, tmp_path / "c", lazy=True)
    assert copying.wait(30)
    timer = _later(release)
    handle.wait_snapshot(30)
    assert release.is_set()
    with torch.no_grad():
        model.weight.mul_(2)  # after the snapshot: not in the checkpoint, no failure
        unsaved = torch.zeros(3)
        unsaved.add_(1)
    handle.wait()
    timer.cancel()
    got = {"model": {"weight": torch.zeros(64, 64), "bias": torch.zeros(64)}}
    shardckpt.load(got, tmp_path / "c")
    assert torch.equal(got["model"]["weight"], want)


def test_wait_snapshot_of_a_blocking_async_save_returns_at_once(tmp_path):
    handle = shardckpt.async_save({"w": torch.ones(4)}, tmp_path / "c")
    handle.wait_snapshot(0)
    handle.wait()
