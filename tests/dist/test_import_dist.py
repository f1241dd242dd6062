"""load_safetensors into sharded states on real gloo ranks: a transformers Llama under FSDP2 at 2
and 3 ranks from save_pretrained's sharded files, and DTensors with column (Shard(1)), row and
replicated placements and a strided shard (several boxes per rank). Every parameter's full_tensor
equals the original, and each rank's ranged reads, counted by a wrapper around the real storage,
cover exactly the bytes of its own shards (computed here from torch.chunk, independently of
shardckpt's layout code), each byte once."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import shardckpt
from tests.dist.harness import run_ranks
from tests.unit.test_export import _tiny_llama

pytestmark = pytest.mark.timeout(300)


def _dtensor_file_contents() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"col": torch.randn(7, 10, generator=g), "row": torch.randn(11, 6, generator=g).bfloat16(),
            "rep": torch.arange(5), "flag": torch.tensor([True, False, True]), "strided": torch.randn(12, 5, generator=g)}


class _Counting:
    """The real storage, with every ranged read recorded as (file, offset, length)."""

    def __init__(self, inner: object, log: list[tuple[str, int, int]]) -> None:
        self.inner, self.log = inner, log

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        self.log.append((name, offset, length))
        return self.inner.read_range(name, offset, length)  # type: ignore[attr-defined]

    def read_into(self, name: str, offset: int, buf: memoryview) -> None:
        self.log.append((name, offset, len(buf)))
        self.inner.read_into(name, offset, buf)  # type: ignore[attr-defined]

    def __getattr__(self, attr: str) -> object:
        return getattr(self.inner, attr)


def _import_worker(rank: int, world: int, hf: str, dt: str, tie: bool) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from shardckpt.interop import safetensors_format

    reads: list[tuple[str, int, int]] = []
    real_open = safetensors_format.open_storage
    safetensors_format.open_storage = lambda where, s3=None: _Counting(real_open(where, s3=s3), reads)  # type: ignore

    torch.manual_seed(123)  # other values than the saved model's
    model = _tiny_llama(tie)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    r = shardckpt.load_safetensors(model, hf)
    assert r.missing == r.unexpected == () and isinstance(model.model.norm.weight, DTensor)
    full = {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in model.state_dict().items()}
    model_reads, reads[:] = list(reads), []

    state = {"col": distribute_tensor(torch.zeros(7, 10), mesh, [Shard(1)]),
             "row": distribute_tensor(torch.zeros(11, 6, dtype=torch.bfloat16), mesh, [Shard(0)]),
             "rep": distribute_tensor(torch.zeros(5, dtype=torch.int64), mesh, [Replicate()]),
             "flag": torch.zeros(3, dtype=torch.bool),
             # FSDP2 over TP's layout on its own: several boxes per rank, each read into its slice.
             "strided": distribute_tensor(torch.zeros(12, 5), mesh, [_StridedShard(0, split_factor=2)])}
    r2 = shardckpt.load_safetensors(state, dt)
    dt_full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}

    # One rank's target does not fit: every rank raises, none reads or writes anything.
    bad = {"flag": torch.zeros(3, dtype=torch.float32 if rank == 1 else torch.bool)}
    try:
        shardckpt.load_safetensors(bad, dt, strict=False)
        failure = None
    except shardckpt.CheckpointError as e:
        failure = type(e).__name__
    return {"full": full if rank == 0 else {}, "reads": model_reads, "bytes": r.bytes_read,
            "dt_full": dt_full if rank == 0 else {}, "dt_reads": list(reads), "dt_bytes": r2.bytes_read,
            "failure": failure, "bad_untouched": not bad["flag"].any()}


def _layout(path) -> tuple[int, dict[str, tuple[int, torch.dtype, tuple[int, ...]]]]:
    """(data start, name -> (first byte, dtype, shape)) from a header this test trusts."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64, "BOOL": torch.bool}
    return 8 + n, {k: (8 + n + v["data_offsets"][0], dtypes[v["dtype"]], tuple(v["shape"])) for k, v in header.items()}


def _rank_bytes(start: int, dtype: torch.dtype, shape: tuple[int, ...], dim: int | None, rank: int,
                world: int, split_factor: int = 1) -> np.ndarray:
    """The file bytes of ``rank``'s shard of a tensor sharded along ``dim`` (None: replicated)
    with torch.chunk semantics, as FSDP2 and DTensor's Shard place them (``split_factor``: chunked
    first into that many pieces, and each of those over the ranks, as _StridedShard does)."""
    elements = np.arange(int(np.prod(shape))).reshape(shape)
    if dim is not None:
        rows = []
        for piece in torch.arange(shape[dim]).chunk(split_factor):
            chunks = piece.chunk(world)
            rows.append(chunks[rank].numpy() if rank < len(chunks) else np.array([], dtype=np.int64))
        elements = np.take(elements, np.concatenate(rows), axis=dim)
    size = dtype.itemsize
    return (start + elements.reshape(-1)[:, None] * size + np.arange(size)[None, :]).reshape(-1)


def _check_reads(reads: list[tuple[str, int, int]], files: dict[str, tuple[int, dict]], expected: np.ndarray) -> None:
    data = [(f, o, n) for f, o, n in reads if o >= files[f][0]]
    headers = [(f, o, n) for f, o, n in reads if o < files[f][0]]
    assert all((o, n) in ((0, 8), (8, files[f][0] - 8)) for f, o, n in headers)  # the length, then the header
    got = np.concatenate([np.arange(o, o + n) + _file_base(files, f) for f, o, n in data] or [np.zeros(0, np.int64)])
    assert len(got) == len(expected), "a byte was read twice, or bytes outside this rank's shards were read"
    assert np.array_equal(np.sort(got), np.sort(expected))


def _file_base(files: dict[str, tuple[int, dict]], name: str) -> int:
    return sorted(files).index(name) << 40  # byte offsets of different files kept apart


@pytest.mark.parametrize("world, tie", [(2, False), (3, True)])
def test_fsdp2_llama_imports_bit_exactly_reading_only_its_own_bytes(tmp_path, world, tie):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _tiny_llama(tie)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="20KB")
    dt_file = tmp_path / "dt.safetensors"
    from safetensors.torch import save_file

    save_file(_dtensor_file_contents(), dt_file)
    results = run_ranks(world, _import_worker, str(tmp_path / "hf"), str(dt_file), tie)

    # Every parameter, gathered, is the saved one bit for bit.
    want = model.state_dict()
    full = results[0]["full"]
    assert set(full) == set(want)
    for name, t in want.items():
        assert torch.equal(full[name].view(torch.uint8), t.view(torch.uint8)), name
    dt_want = _dtensor_file_contents()
    assert all(torch.equal(results[0]["dt_full"][k], v) for k, v in dt_want.items())

    # Each rank read exactly its shards' bytes (FSDP2: row chunks of every tensor in the files).
    files = {p.name: _layout(p) for p in (tmp_path / "hf").glob("*.safetensors")}
    total = 0
    for rank, res in enumerate(results):
        expected = [_rank_bytes(start, dtype, shape, 0, rank, world) + _file_base(files, f)
                    for f, (_, tensors) in files.items() for start, dtype, shape in tensors.values()]
        expected_all = np.concatenate(expected)
        _check_reads(res["reads"], files, expected_all)
        assert res["bytes"] == len(expected_all)
        total += res["bytes"]
    assert total == sum(t.numel() * t.itemsize for n, t in want.items() if not (tie and n == "lm_head.weight"))

    # DTensors: a column shard is one run per row, a replicated tensor is read whole by every rank.
    dt_files = {dt_file.name: _layout(dt_file)}
    placements = {"col": (1, 1), "row": (0, 1), "rep": (None, 1), "flag": (None, 1), "strided": (0, 2)}
    for rank, res in enumerate(results):
        expected = np.concatenate([_rank_bytes(start, dtype, shape, placements[k][0], rank, world, placements[k][1])
                                   for k, (start, dtype, shape) in dt_files[dt_file.name][1].items()])
        _check_reads(res["dt_reads"], dt_files, expected)
        assert res["dt_bytes"] == len(expected)

    # The rank whose target did not fit raised its own error; the others were told, and nothing was filled.
    assert [res["failure"] for res in results] == ["RankFailedError", "StateMismatchError"] + ["RankFailedError"] * (
        world - 2)
    assert all(res["bad_untouched"] for res in results)
