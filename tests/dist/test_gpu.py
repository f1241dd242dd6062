"""CUDA checkpoints: round trips stay bit-exact and land on the device, CPU checkpoints load onto
GPUs, and two GPU ranks save and load sharded state over a "cpu:gloo,cuda:nccl" group (issue 11,
item 7). Marked ``gpu`` and skipped without CUDA; benchmarks/gpu_run.sh runs them on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import shardckpt
from tests.dist.harness import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(180),
]


def _state(device: str) -> dict[str, object]:
    """Several dtypes, a nested dict, a non-contiguous tensor and float bit patterns that a value
    comparison would let through (NaN payloads, -0.0, inf)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(1024, 515, generator=g)
    w[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")])
    return {
        "w": w.to(device),
        "bf16": torch.randn(300, 77, generator=g).to(torch.bfloat16).to(device),
        "half": torch.randn(4099, generator=g).to(torch.float16).to(device),
        "ids": torch.randint(-(1 << 40), 1 << 40, (513,), generator=g).to(device),
        "mask": (torch.rand(33, 9, generator=g) > 0.5).to(device),
        "t": torch.randn(40, 64, generator=g).to(device).t(),  # non-contiguous
        "nested": {"b": torch.randn(7, generator=g).to(device)},
        "step": 3,
    }


def _tensors(state: dict[str, object], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_tensors(v, f"{prefix}{k}/"))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _targets(state: dict[str, object], device: str) -> dict[str, object]:
    """Zeroed tensors of the same shapes and dtypes on ``device`` (the non-contiguous one too)."""
    out: dict[str, object] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _targets(v, device)
        elif isinstance(v, torch.Tensor):
            z = torch.zeros_like(v, device=device)
            out[k] = torch.zeros(v.t().shape, dtype=v.dtype, device=device).t() if k == "t" else z
        else:
            out[k] = 0
    return out


def _assert_same(got: dict[str, object], want: dict[str, object], device: str) -> None:
    g, w = _tensors(got), _tensors(want)
    assert g.keys() == w.keys()
    for k in w:
        assert g[k].device.type == device, (k, g[k].device)
        assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
        assert torch.equal(_bits(g[k]), _bits(w[k])), f"{k}: bits differ"
    assert got["step"] == want["step"]


@pytest.mark.parametrize("compression", ["auto", "zstd", "none"])
def test_cuda_round_trip_is_bit_exact_and_stays_on_device(tmp_path, compression):
    state = _state("cuda")
    shardckpt.save(state, tmp_path / "c", compression=compression)
    target = _targets(state, "cuda")
    ptrs = {k: t.data_ptr() for k, t in _tensors(target).items()}
    shardckpt.load(target, tmp_path / "c")
    _assert_same(target, state, "cuda")
    # Filled in place: the model's own device tensors, not replacements.
    assert {k: t.data_ptr() for k, t in _tensors(target).items()} == ptrs


def test_cuda_async_save_round_trip(tmp_path):
    state, want = _state("cuda"), _state("cuda")
    handle = shardckpt.async_save(state, tmp_path / "a")
    for t in _tensors(state).values():
        t.zero_()  # after async_save returns the snapshot is taken: training may write in place
    handle.wait()
    target = _targets(want, "cuda")
    shardckpt.load(target, tmp_path / "a")
    _assert_same(target, want, "cuda")
    shardckpt.shutdown()


def test_cpu_checkpoint_loads_onto_cuda_targets(tmp_path):
    state = _state("cpu")
    shardckpt.save(state, tmp_path / "cpu")
    target = _targets(state, "cuda")
    shardckpt.load(target, tmp_path / "cpu")
    _assert_same(target, state, "cuda")


def test_cuda_checkpoint_loads_onto_cpu_targets(tmp_path):
    state = _state("cuda")
    shardckpt.save(state, tmp_path / "gpu")
    target = _targets(state, "cpu")
    shardckpt.load(target, tmp_path / "gpu")
    _assert_same(target, state, "cpu")


def _two_gpu_ranks(rank: int, world: int, path: str, init_file: str) -> list[str]:
    """Runs under the harness's gloo group, replaced here by the GPU layout's "cpu:gloo,cuda:nccl"
    group (the harness builds a gloo-only one)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.destroy_process_group()
    torch.cuda.set_device(rank)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cuda", (world,))
    g = torch.Generator().manual_seed(5)
    full = torch.randn(67, 33, generator=g)  # 67 rows: uneven shards
    rep = torch.randn(129, generator=g).to(torch.bfloat16)
    state = {"sharded": distribute_tensor(full.cuda(), mesh, [Shard(0)]), "rep": rep.cuda(), "step": 9}
    shardckpt.save(state, f"{path}/sync")
    handle = shardckpt.async_save(state, f"{path}/async")
    state["sharded"].to_local().zero_()  # the snapshot is taken: in-place writes must not reach it
    handle.wait()
    bad = []
    for name in ("sync", "async"):
        target = {"sharded": distribute_tensor(torch.zeros_like(full).cuda(), mesh, [Shard(0)]),
                  "rep": torch.zeros_like(rep).cuda(), "step": 0}
        shardckpt.load(target, f"{path}/{name}")
        local = target["sharded"].to_local()
        want_local = full.tensor_split(world)[rank]
        if local.device.type != "cuda" or not torch.equal(_bits(local), _bits(want_local)):
            bad.append(f"{name}: sharded")
        if target["rep"].device.type != "cuda" or not torch.equal(_bits(target["rep"]), _bits(rep)):
            bad.append(f"{name}: replicated")
        if target["step"] != 9:
            bad.append(f"{name}: step")
        # Re-sharded: the whole tensor onto every rank's GPU, from the sharded save.
        whole = {"sharded": torch.zeros_like(full).cuda()}
        shardckpt.load(whole, f"{path}/{name}")
        if not torch.equal(_bits(whole["sharded"]), _bits(full)):
            bad.append(f"{name}: re-sharded whole")
    shardckpt.shutdown()
    return bad


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_ranks_save_and_load_sharded_state(tmp_path):
    results = run_ranks(2, _two_gpu_ranks, str(tmp_path / "ckpt"), str(tmp_path / "gpu-store"), timeout=150)
    assert results == [[], []]
