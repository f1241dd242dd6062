"""Save at N ranks, load at M ranks, bit-exact on every tensor, across layouts."""

from __future__ import annotations

import math

import pytest
import torch

import shardckpt
from tests.dist.harness import run_ranks
from tests.dist.states import SPECS, expected, local_expected, place, same_bits

SMALL_BLOCKS = shardckpt.CompressionOptions(block_bytes=16 << 10)


def _values() -> dict[str, object]:
    return {"step": 7, "cfg": {"lr": 1e-3, "betas": (0.9, 0.95), "ids": {0: "a", 1: "b"}, "bad": float("nan")}}


def save_worker(rank: int, world_size: int, path: str, compression: object) -> int:
    state: dict[str, object] = {k: place(k, expected(k), world_size, 0) for k in SPECS}
    # A non-contiguous plain tensor with the same values.
    state["plain_f32"] = expected("plain_f32").t().contiguous().t()
    state["meta"] = _values()
    res = shardckpt.save(state, path, compression=compression)
    return res.rank_bytes_raw


def load_worker(rank: int, world_size: int, paths: list[str]) -> list[str]:
    wrong = []
    for path in paths:
        state: dict[str, object] = {}
        for k in SPECS:
            state[k] = place(k, torch.zeros_like(expected(k)), world_size, 1)
        state["plain_f32"] = torch.zeros(1000, 3).t()  # non-contiguous target
        state["meta"] = {"step": 0, "cfg": None}
        shardckpt.load(state, path)
        for k in SPECS:
            local, want = local_expected(k, state[k])  # type: ignore[arg-type]
            if not same_bits(local, want):
                wrong.append(f"{path}:{k}")
        meta = state["meta"]
        assert isinstance(meta, dict) and meta["step"] == 7
        cfg = meta["cfg"]
        assert cfg["betas"] == (0.9, 0.95) and cfg["ids"] == {0: "a", 1: "b"} and math.isnan(cfg["bad"])
    return wrong


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_save_n_load_m_bit_exact(tmp_path, n):
    paths = []
    for compression in (SMALL_BLOCKS, "none"):
        path = str(tmp_path / f"ckpt-{n}-{'z' if compression != 'none' else 'raw'}")
        written = run_ranks(n, save_worker, path, compression)
        if n > 1:
            # Replicated plain tensors are spread: every rank writes something, nobody writes all.
            assert all(w > 0 for w in written), written
            if compression is SMALL_BLOCKS:  # big tensors are cut into bands shared by their holders
                assert max(written) < sum(written) * 0.8, written
        shardckpt.verify(path)
        paths.append(path)
    index = shardckpt.read_index(paths[0])
    assert index.world_size == n
    assert any(b.codec == "planes" for t in index.tensors for b in t.blocks)
    for m in (1, 2, 3, 4):
        assert run_ranks(m, load_worker, paths) == [[] for _ in range(m)], f"save at {n}, load at {m}"
