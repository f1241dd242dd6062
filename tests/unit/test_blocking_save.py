"""The blocking save streams through the same staged pipeline as async_save (saving.save_streaming):
host tensors in place, the others through a ring bounded by the staging budget."""

from __future__ import annotations

import threading

import pytest
import torch

import shardckpt
from shardckpt import saving
from shardckpt.storage import faults


@pytest.fixture
def ring(monkeypatch):
    monkeypatch.setenv("SHARDCKPT_STAGING_BYTES", str(4 << 20))
    saving._RING.peak_bytes = 0
    yield saving._RING
    faults.configure("")


def _strided_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(512, 1024, generator=g).t() for i in range(8)}  # 8 x 2 MiB, not contiguous


def test_a_save_larger_than_the_ring_streams_through_it_and_loads_bit_exactly(tmp_path, ring):
    state = _strided_state()
    result = shardckpt.save(state, tmp_path / "c", compression="none")
    assert result.rank_bytes_raw == 16 << 20
    # Every tensor went through the ring (a copy of all 16 MiB at once would pass the budget).
    assert 0 < ring.peak_bytes <= 4 << 20
    target = {k: torch.empty(v.shape) for k, v in state.items()}
    shardckpt.load(target, tmp_path / "c")
    assert all(torch.equal(target[k], state[k]) for k in state)


def test_contiguous_host_tensors_are_written_in_place(tmp_path, ring):
    state = {f"t{i}": torch.randn(256, 1024) for i in range(4)}
    shardckpt.save(state, tmp_path / "c")
    assert ring.peak_bytes == 0
    target = {k: torch.empty_like(v) for k, v in state.items()}
    shardckpt.load(target, tmp_path / "c")
    assert all(torch.equal(target[k], state[k]) for k in state)


def test_a_save_that_fails_mid_stream_leaves_the_ring_usable(tmp_path, ring):
    state = _strided_state()
    shardckpt.save(state, tmp_path / "c", compression="none")
    faults.configure("stage:3:eio")
    with pytest.raises(shardckpt.CheckpointError):
        shardckpt.save(state, tmp_path / "c", compression="none")
    faults.configure("")
    # The failed save took buffers it never handed back; the next one must not wait for them.
    saved = threading.Thread(target=shardckpt.save, args=(state, tmp_path / "c"), kwargs={"compression": "none"}, daemon=True)
    saved.start()
    saved.join(60)
    assert not saved.is_alive(), "the save after a failed one waits for buffers that never come back"
    target = {k: torch.empty(v.shape) for k, v in state.items()}
    shardckpt.load(target, tmp_path / "c")
    assert all(torch.equal(target[k], state[k]) for k in state)
    assert ring.held_bytes <= 4 << 20


def test_shutdown_gives_the_ring_back_and_the_next_save_still_works(tmp_path, ring):
    state = _strided_state()
    shardckpt.save(state, tmp_path / "a", compression="none")
    assert ring.held_bytes > 0  # kept across saves: pinned memory is slow to allocate
    shardckpt.shutdown()
    assert ring.held_bytes == 0
    shardckpt.save(state, tmp_path / "b", compression="none")
    target = {k: torch.empty(v.shape) for k, v in state.items()}
    shardckpt.load(target, tmp_path / "b")
    assert all(torch.equal(target[k], state[k]) for k in state)


def test_snapshot_copies_of_parameters_do_not_track_gradients():
    # stage() hands parameters to the copier undetached: the copies must not join autograd, or
    # every pooled staging buffer would carry a graph node from then on.
    from shardckpt.pipeline.staging import DeviceCopier

    param = torch.nn.Parameter(torch.randn(5))
    bufs = [torch.empty(5), torch.empty(5)]
    DeviceCopier().copy_host([bufs[0]], [param])
    DeviceCopier().copy(bufs[1], param)
    for buf in bufs:
        assert not buf.requires_grad and buf.grad_fn is None
        assert torch.equal(buf, param.detach())
