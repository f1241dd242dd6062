"""async_save on both backends (``place``: a local directory and a moto S3 prefix): a failure on the
background thread reaches wait() or the next save, a write error mid-save keeps the previous
checkpoint (and leaves no file or object behind), back-to-back saves never interleave. The
snapshot, memory and leak tests stay in test_async.py: they are about staging, not storage."""

from __future__ import annotations

import pytest
import torch

import shardckpt
from shardckpt.storage import faults
from tests.backends import Place

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _fresh_savers():
    yield
    faults.configure("")
    shardckpt.shutdown()


def _state(seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(512, 384, generator=g), "h": torch.randn(1000, generator=g).to(torch.bfloat16), "step": seed}


def _loaded(path: object) -> dict[str, object]:
    state: dict[str, object] = {"w": torch.zeros(512, 384), "h": torch.zeros(1000, dtype=torch.bfloat16), "step": -1}
    shardckpt.load(state, path)  # type: ignore[arg-type]
    return state


def test_background_failure_from_wait_and_next_save(place: Place):
    faults.configure("fsync:1:eio")  # finishing the data file (local fsync, S3 upload completion) fails
    handle = shardckpt.async_save(_state(1), place.at("a"))
    with pytest.raises(shardckpt.CheckpointIOError, match="injected at fsync"):
        handle.wait()
    assert place.files("a") == []  # no index, and the failed save's data file is gone
    shardckpt.async_save(_state(2), place.at("ok")).wait()  # seen once through wait(): not raised again
    faults.configure("fsync:1:eio")
    shardckpt.async_save(_state(3), place.at("b"))
    with pytest.raises(shardckpt.CheckpointError, match="previous async save"):
        shardckpt.async_save(_state(4), place.at("never"))  # not seen: the next save raises it
    assert place.files("never") == []
    shardckpt.async_save(_state(5), place.at("again")).wait()
    assert _loaded(place.at("again"))["step"] == 5 and shardckpt.verify(place.at("again")).orphans == ()


def test_write_error_mid_save_keeps_previous_checkpoint(place: Place):
    small_blocks = shardckpt.CompressionOptions(block_bytes=64 << 10)
    shardckpt.async_save(_state(1), place.at("ckpt"), compression=small_blocks).wait()
    before = place.contents()
    faults.configure("write:4:eio")  # the header and two blocks went through
    handle = shardckpt.async_save(_state(2), place.at("ckpt"), compression=small_blocks)
    with pytest.raises(shardckpt.CheckpointIOError, match="injected at write"):
        handle.wait()
    faults.configure("")
    assert place.contents() == before  # the torn save left nothing behind
    assert shardckpt.verify(place.at("ckpt")).orphans == ()
    assert _loaded(place.at("ckpt"))["step"] == 1


def test_back_to_back_saves_never_interleave(place: Place):
    states = [_state(i) for i in range(6)]
    handles = [shardckpt.async_save(s, place.at(f"s{i % 2}")) for i, s in enumerate(states)]
    results = [h.wait() for h in handles]
    assert len({r.save_id for r in results}) == 6
    for j in range(2):
        assert shardckpt.verify(place.at(f"s{j}")).orphans == ()
        last = max(i for i in range(6) if i % 2 == j)
        got = _loaded(place.at(f"s{j}"))
        assert got["step"] == last and torch.equal(got["w"], states[last]["w"])  # type: ignore[arg-type]
        assert len(place.files(f"s{j}/data")) == 1  # stale data of older saves removed
