"""2-D and hybrid layouts: tensor parallel + FSDP2 on a (dp, tp) mesh, whose column-parallel weights
FSDP2 shards with ``_StridedShard``, saved at (dp=2, tp=2) with AdamW state and loaded bit-exactly at
(dp=1, tp=2), (dp=4, tp=1), HSDP and one plain process; an LM head tied to the embedding is saved
once and comes back tied. After each load one more training step runs."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

import shardckpt
from tests.dist.harness import run_ranks

pytestmark = pytest.mark.timeout(240)

VOCAB, DIM, HIDDEN = 29, 12, 22  # 22 hidden rows: 11 per TP rank, 6/5 per FSDP rank (uneven)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.w1 = nn.Linear(DIM, HIDDEN)  # column parallel: (_StridedShard(0), Shard(0)) under FSDP2
        self.w2 = nn.Linear(HIDDEN, DIM)  # row parallel: (Shard(0), Shard(1))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids)
        h = h + self.w2(torch.relu(self.w1(h)))
        return self.head(h)


def _build(layout: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = Tiny()
    if layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for m in (model.w1, model.w2, model):
            fully_shard(m, mesh=mesh)
    elif layout != "plain":
        dp, tp = {"dp2tp2": (2, 2), "dp1tp2": (1, 2), "dp4tp1": (4, 1)}[layout]
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
        for m in (model.w1, model.w2, model):
            fully_shard(m, mesh=mesh["dp"])
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    ids = torch.arange(16).remainder(VOCAB).reshape(2, 8)  # the same batch on every rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP2's note on view outputs of the tiny Linear
        model(ids).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and AdamW tensor, unsharded (a collective: every rank takes part)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    def full(t: torch.Tensor) -> torch.Tensor:
        # A copy: full_tensor() of a tensor that no mesh dimension splits may be the parameter itself.
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    msd, osd = get_state_dict(model, opt)
    out = {f"model/{k}": full(v) for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        for name, t in st.items():
            out[f"optim/{fqn}/{name}"] = full(t)
    return out


def save_worker(rank: int, world_size: int, path: str) -> dict[str, object]:
    from torch.distributed.tensor.placement_types import _StridedShard

    model, opt = _build("dp2tp2", seed=0)
    assert any(isinstance(p, _StridedShard) for p in model.w1.weight.placements)  # the layout under test
    for _ in range(2):
        _step(model, opt)
    shardckpt.save({"model": model, "optim": opt, "step": 2}, path)
    saved = _full(model, opt)
    _step(model, opt)
    after = _full(model, opt)
    return {"saved": saved, "after": after} if rank == 0 else {}


def load_worker(rank: int, world_size: int, path: str, layout: str) -> dict[str, object]:
    model, opt = _build(layout, seed=123)  # different initial values, no optimizer state yet
    state: dict[str, object] = {"model": model, "optim": opt, "step": 0}
    shardckpt.load(state, path)
    assert state["step"] == 2
    assert model.head.weight is model.tok.weight  # still tied: one Parameter object
    loaded = _full(model, opt)
    _step(model, opt)
    assert model.head.weight is model.tok.weight
    after = _full(model, opt)
    return {"loaded": loaded, "after": after} if rank == 0 else {}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    wrong = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(_bits(got[k]), _bits(want[k]))]
    assert not wrong, wrong


@pytest.fixture(scope="module")
def saved_2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, object]]:
    path = str(tmp_path_factory.mktemp("ckpt2d") / "ckpt")
    return path, run_ranks(4, save_worker, path)[0]


def test_save_dp2_tp2_stores_each_element_once(saved_2d):
    path, want = saved_2d
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    tensors = {t["key"]: t for t in index["tensors"]}
    # The tied head is saved once, under the embedding's name.
    assert "model/tok.weight" in tensors and "model/head.weight" not in tensors
    assert any(k.endswith("exp_avg_sq") for k in tensors)
    for key, t in tensors.items():
        # Blocks tile each tensor exactly once: replicas deduplicated, strided shards not doubled.
        covered = sum(_volume(b[1]) for b in t["blocks"])
        assert covered == _volume(t["shape"]), key
    # The strided w1 rows come from four ranks: (dp, tp) holds rows tp*11 + [0:6] or [6:11].
    w1 = tensors["model/w1.weight"]
    starts = sorted(b[0][0] for b in w1["blocks"])
    assert starts == [0, 6, 11, 17]
    assert len({index["files"][b[2]]["rank"] for b in w1["blocks"]}) == 4


def _volume(sizes: list[int]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


@pytest.mark.parametrize(("layout", "world"), [("dp1tp2", 2), ("dp4tp1", 4), ("hsdp", 4)])
def test_load_2d_checkpoint_bit_exact_then_train(saved_2d, layout, world):
    path, want = saved_2d
    got = run_ranks(world, load_worker, path, layout)[0]
    _assert_same_bits(got["loaded"], want["saved"])
    _assert_next_step(layout, got["after"], want["after"])


def test_load_2d_checkpoint_into_one_plain_process(saved_2d):
    path, want = saved_2d
    got = load_worker(0, 1, path, "plain")  # no process group, no mesh: plain tensors
    _assert_same_bits(got["loaded"], want["saved"])
    _assert_next_step("plain", got["after"], want["after"])


def _assert_next_step(layout: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The step after the load matches the saving job's next step: bit for bit where the layout
    computes the same sums in the same order, within float rounding where it does not."""
    assert sorted(got) == sorted(want)
    if layout == "dp1tp2":
        _assert_same_bits(got, want)
        return
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def strided_worker(rank: int, world_size: int, path: str) -> list[str]:
    """A strided shard that no later placement completes (a 1-D slice of a FSDP2 + TP layout)
    holds several boxes: load places each saved block into its own local slices (with and
    without read_once), and save writes every box."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(9 * 3, dtype=torch.float32).reshape(9, 3)
    shardckpt.save({"x": distribute_tensor(full, mesh, [Shard(0)])}, path)
    strided = _StridedShard(0, split_factor=2)
    # Rank 0 holds rows [0:3] + [5:7], rank 1 rows [3:5] + [7:9]: two boxes each.
    want = strided._split_tensor(full, world_size, with_padding=False)[0][rank]
    errors = []
    for read_once in (False, True):
        target = DTensor.from_local(torch.zeros_like(want), mesh, [strided], shape=full.shape, stride=full.stride())
        shardckpt.load({"x": target}, path, read_once=read_once)
        if not torch.equal(target.to_local(), want):
            errors.append(f"rank {rank}, read_once={read_once}: {target.to_local().tolist()} != {want.tolist()}")
    # Save writes every box of a multi-box shard; a Shard(0) target reads them back.
    shardckpt.save({"x": target}, path + "-strided")
    back = distribute_tensor(torch.zeros_like(full), mesh, [Shard(0)])
    shardckpt.load({"x": back}, path + "-strided")
    if not torch.equal(back.full_tensor(), full):
        errors.append(f"rank {rank}: the saved strided shard came back as {back.full_tensor().tolist()}")
    # A real layout with several boxes per rank: a row-parallel weight (Shard(1)) flattened, which
    # DTensor turns into _StridedShard(0, split_factor=rows): each rank holds 5 runs of 4.
    weight = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    flat = distribute_tensor(weight, mesh, [Shard(1)]).flatten()
    assert isinstance(flat.placements[0], _StridedShard), flat.placements
    shardckpt.save({"flat": flat}, path + "-flat")
    again = distribute_tensor(torch.zeros(5, 8), mesh, [Shard(1)]).flatten()
    shardckpt.load({"flat": again}, path + "-flat")
    if not torch.equal(again.to_local(), flat.to_local()):
        errors.append(f"rank {rank}: the flattened weight's local data differs after a round trip")
    return errors


def test_strided_shard_with_several_boxes_saves_and_loads(tmp_path):
    path = str(tmp_path / "ckpt")
    assert run_ranks(2, strided_worker, path) == [[], []]
    # Every box of every rank was written, once: one plain process reads the whole tensors.
    got = shardckpt.load_all(path + "-strided")["x"]
    assert torch.equal(got, torch.arange(27, dtype=torch.float32).reshape(9, 3))
    flat = shardckpt.load_all(path + "-flat")["flat"]
    assert torch.equal(flat, torch.randn(5, 8, generator=torch.Generator().manual_seed(3)).flatten())
    index = shardckpt.read_index(path + "-flat")
    assert sum(b.sizes[0] for b in index.tensors[0].blocks) == 40


class _CopyingStateDict(nn.Sequential):
    """A module whose state_dict() hands out copies: its tied names do not share memory there, so
    the second name must be given the first one's loaded tensor, not left holding stale values."""

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return {k: v.clone() for k, v in super().state_dict(*args, **kwargs).items()}


def test_tied_parameters_one_process_saved_once_restored_tied(tmp_path):
    """No process group: the tie is found from the module's structure (DDP/compile prefixes
    dropped as get_model_state_dict does), saved under the first name, and restored through it."""
    path = str(tmp_path / "ckpt")
    torch.manual_seed(0)
    model = Tiny()
    wrapped = torch.nn.Sequential(model)  # the tie sits one level down: names "0.tok.weight", "0.head.weight"
    shardckpt.save({"m": wrapped}, path)
    keys = {t.key for t in shardckpt.read_index(path).tensors}
    assert "m/0.tok.weight" in keys and "m/0.head.weight" not in keys

    for cls in (torch.nn.Sequential, _CopyingStateDict):
        torch.manual_seed(1)
        fresh = cls(Tiny())
        shardckpt.load({"m": fresh}, path)
        assert fresh[0].head.weight is fresh[0].tok.weight
        assert torch.equal(_bits(fresh[0].tok.weight.detach()), _bits(model.tok.weight.detach())), cls

    # An untied target has nothing to fill its second name from: that is a missing key, not a
    # silent partial load.
    untied = torch.nn.Sequential(Tiny())
    untied[0].head.weight = nn.Parameter(torch.zeros(VOCAB, DIM))
    with pytest.raises(shardckpt.MissingKeysError, match="head.weight"):
        shardckpt.load({"m": untied}, path)


def _tp_tied(seed: int, tp: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Tiny with the embedding and the tied LM head tensor-parallel over the vocabulary (both
    Shard(0) on the tp mesh), tied again after parallelize_module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = Tiny()
    if tp:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, {
            "tok": RowwiseParallel(input_layouts=Replicate()),
            "w1": ColwiseParallel(),
            "w2": RowwiseParallel(),
            "head": ColwiseParallel(output_layouts=Replicate()),
        })
        # parallelize_module gave each a Parameter of its own: tie them again (same placements).
        model.head.weight = model.tok.weight
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def tp_tied_worker(rank: int, world_size: int, path: str) -> dict[str, object]:
    model, opt = _tp_tied(0, tp=True)
    _step(model, opt)
    shardckpt.save({"model": model, "optim": opt}, path)
    saved = _full(model, opt)
    fresh, fresh_opt = _tp_tied(5, tp=True)
    shardckpt.load({"model": fresh, "optim": fresh_opt}, path)
    assert fresh.head.weight is fresh.tok.weight
    loaded = _full(fresh, fresh_opt)
    _step(fresh, fresh_opt)  # trains on, still tied
    assert fresh.head.weight is fresh.tok.weight
    return {"saved": saved, "loaded": loaded} if rank == 0 else {}


def test_tied_head_under_tensor_parallel_saved_once_restored_tied(tmp_path):
    path = str(tmp_path / "ckpt")
    got = run_ranks(2, tp_tied_worker, path)[0]
    _assert_same_bits(got["loaded"], got["saved"])
    keys = {t.key for t in shardckpt.read_index(path).tensors}
    assert "model/tok.weight" in keys and "model/head.weight" not in keys
    # One plain process: the tie comes back from the module's structure, with the saved values.
    model, opt = _tp_tied(9, tp=False)
    shardckpt.load({"model": model, "optim": opt}, path)
    assert model.head.weight is model.tok.weight
    assert torch.equal(_bits(model.tok.weight.detach()), _bits(got["saved"]["model/tok.weight"]))
