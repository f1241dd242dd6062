"""docs/interop.md's recipe for reading an export outside PyTorch, run as written: JAX through
``safetensors.flax`` (bf16 stays bfloat16) and NumPy through ``safetensors.numpy`` (an fp32
export), over a sharded export merged by its index's weight_map. Compared bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import shardckpt

jnp = pytest.importorskip("jax.numpy")
flax_st = pytest.importorskip("safetensors.flax")
numpy_st = pytest.importorskip("safetensors.numpy")
pytestmark = pytest.mark.timeout(180)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"embed.weight": torch.randn(64, 16, generator=g).bfloat16(),
            "layers.0.weight": torch.randn(16, 16, generator=g).bfloat16(),
            "layers.0.bias": torch.randn(16, generator=g).bfloat16(),
            "positions": torch.arange(64, dtype=torch.int64)}


def _merged(load_file, out) -> dict[str, object]:
    # The recipe for a sharded export: every file named in the weight_map, merged.
    files = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(files) > 1
    return {k: v for f in sorted(files) for k, v in load_file(str(out / f)).items()}


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


def test_jax_reads_a_bf16_export_bit_exactly(tmp_path):
    import jax

    # JAX turns int64 into int32 unless 64-bit types are on (docs/interop.md says so).
    jax.config.update("jax_enable_x64", True)
    state = _state()
    shardckpt.save({"model": state}, tmp_path / "ckpt")
    shardckpt.export_safetensors(tmp_path / "ckpt", tmp_path / "hf", key="model", max_shard_size="3KB")
    params = _merged(flax_st.load_file, tmp_path / "hf")
    assert set(params) == set(state)
    for name, want in state.items():
        got = params[name]
        assert got.dtype == (jnp.bfloat16 if want.dtype == torch.bfloat16 else jnp.int64), name
        assert tuple(got.shape) == tuple(want.shape), name
        assert np.asarray(got).view(np.uint8).tobytes() == _bits(want).tobytes(), name


def test_numpy_reads_an_fp32_export_and_refuses_nothing_silently(tmp_path):
    state = _state()
    shardckpt.save({"model": state}, tmp_path / "ckpt")
    shardckpt.export_safetensors(tmp_path / "ckpt", tmp_path / "hf", key="model", dtype="fp32", max_shard_size="2KB")
    arrays = _merged(numpy_st.load_file, tmp_path / "hf")
    for name, want in state.items():
        expect = want.float() if want.is_floating_point() else want
        assert arrays[name].dtype == expect.numpy().dtype and np.array_equal(arrays[name], expect.numpy()), name
