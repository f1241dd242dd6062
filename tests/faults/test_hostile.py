"""Hostile and malformed input, bounded (issue 10): states that cannot be saved fail with a
StateMismatchError naming the key, before anything is committed; loads and converts allocate only
what the data files really hold; verify's memory does not grow with the checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import CheckpointError, CorruptCheckpointError, PerRank, StateMismatchError
from shardckpt.cli import main as cli
from tests.stateful import Holder

pytestmark = pytest.mark.timeout(180)




# --- D: states that cannot be saved -------------------------------------------------------------


def _deep(levels: int, leaf: object, container: str) -> object:
    node = leaf
    for _ in range(levels):
        node = [node] if container == "list" else {"a": node}
    return node


def _self_dict(leaf: object = 1) -> dict[str, object]:
    d: dict[str, object] = {"leaf": leaf}
    d["me"] = d
    return d


def _self_list() -> list[object]:
    lst: list[object] = [1]
    lst.append(lst)
    return lst


def _two_way_cycle() -> dict[str, object]:
    # Without cycle detection, walking both branches of every level costs 2**depth.
    d: dict[str, object] = {}
    d["x"] = d
    d["y"] = d
    return d


def _nested_tensor() -> torch.Tensor:
    return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


# name -> (state factory, text the StateMismatchError must contain)
UNSAVEABLE: dict[str, tuple[Callable[[], dict[str, object]], str]] = {
    "sparse-coo": (lambda: {"w": torch.eye(3).to_sparse()}, "'w'"),
    "sparse-csr": (lambda: {"w": torch.eye(3).to_sparse_csr()}, "'w'"),
    "meta": (lambda: {"m": {"w": torch.empty(3, device="meta")}}, "'m/w'"),
    "nested": (lambda: {"w": _nested_tensor()}, "'w'"),
    "conjugate-view": (lambda: {"w": torch.ones(3, dtype=torch.complex64).conj()}, "'w'"),
    "per-rank-meta": (lambda: {"w": PerRank(torch.empty(3, device="meta"))}, "'w'"),
    "lists-100k-deep": (lambda: {"a": _deep(100_000, 1, "list")}, "'a'"),
    "dicts-100k-deep": (lambda: {"a": _deep(100_000, 1, "dict")}, "'a'"),
    "tensor-100k-deep": (lambda: {"a": _deep(100_000, torch.ones(1), "dict")}, "'a'"),
    "dict-contains-itself": (lambda: {"a": _self_dict()}, "'a'"),
    "list-contains-itself": (lambda: {"a": _self_list()}, "'a'"),
    "dict-contains-itself-twice": (lambda: {"a": _two_way_cycle()}, "'a'"),
    "dict-with-tensor-contains-itself": (lambda: {"a": _self_dict(torch.ones(1))}, "'a/me/me"),
    "key-nul": (lambda: {"a\x00b": torch.ones(1)}, repr("a\x00b")),
    "key-control": (lambda: {"m": {"x\x1b[2J": 1, "t": torch.ones(1)}}, repr("x\x1b[2J")),
    "key-lone-surrogate": (lambda: {"\ud800": torch.ones(1)}, repr("\ud800")),
    "walked-key-lone-surrogate": (lambda: {"m": {"\udc80": 1, "t": torch.ones(1)}}, repr("\udc80")),
    "key-int-2**64": (lambda: {"opt": {2**64: torch.ones(1)}}, "'opt'"),
    "key-int-10**5000": (lambda: {"opt": {10**5000: torch.ones(1)}}, "'opt'"),
    "value-int-2**64": (lambda: {"n": 2**64}, "'n'"),
    "value-int-below-int64": (lambda: {"n": -(2**63) - 1}, "'n'"),
    "value-int-10**5000": (lambda: {"cfg": {"seed": 10**5000}}, "'cfg'"),
    "value-dict-key-2**64": (lambda: {"cfg": {2**64: "x"}}, "'cfg'"),
}


@pytest.mark.parametrize("case", list(UNSAVEABLE))
def test_unsaveable_state_names_the_key(tmp_path, case):
    make, fragment = UNSAVEABLE[case]
    path = tmp_path / "ckpt"
    with pytest.raises(StateMismatchError) as info:
        shardckpt.save(make(), path)
    assert fragment in str(info.value), str(info.value)
    assert len(str(info.value)) < 2000  # a 100k-deep key is shortened, not pasted whole
    assert not (path / "index.json").exists()


def test_metadata_int_beyond_64_bits(tmp_path):
    with pytest.raises(StateMismatchError, match="'metadata'"):
        shardckpt.save({"w": torch.ones(1)}, tmp_path / "ckpt", metadata={"seed": 2**64})


def test_ints_at_the_64_bit_bounds_round_trip(tmp_path):
    path = tmp_path / "ckpt"
    state = {"lo": -(2**63), "hi": 2**64 - 1, "opt": {2**63 - 1: torch.ones(2), -(2**63): torch.zeros(2)}}
    shardckpt.save(state, path)
    target: dict[str, object] = {"lo": 0, "hi": 0, "opt": {2**63 - 1: torch.empty(2), -(2**63): torch.empty(2)}}
    shardckpt.load(target, path)
    assert target["lo"] == -(2**63) and target["hi"] == 2**64 - 1
    opt = target["opt"]
    assert isinstance(opt, dict) and torch.equal(opt[2**63 - 1], torch.ones(2))


def test_printable_unicode_keys_round_trip(tmp_path):
    path = tmp_path / "ckpt"
    shardckpt.save({"m": {"é 𝔵 😀": torch.ones(2), "tab-free key": 1}}, path)
    target: dict[str, object] = {"m": {"é 𝔵 😀": torch.empty(2), "tab-free key": 0}}
    shardckpt.load(target, path)
    assert torch.equal(target["m"]["é 𝔵 😀"], torch.ones(2))  # type: ignore[index]


def test_deep_value_in_the_load_target_is_a_state_mismatch(tmp_path):
    path = tmp_path / "ckpt"
    shardckpt.save({"w": torch.ones(1)}, path)
    with pytest.raises(StateMismatchError, match="'a"):
        shardckpt.load({"w": torch.empty(1), "a": _self_dict()}, path, strict=False)


# --- C: wrong data, silently --------------------------------------------------------------------


def test_nul_key_cannot_alias_a_per_rank_item(tmp_path):
    """Saves key per-rank items "key\\0rank" internally: a global key "x\\0" + "0" must not share
    that name with PerRank "x" (one tensor's bytes would be written for both)."""
    path = tmp_path / "ckpt"
    with pytest.raises(StateMismatchError, match=repr("x\x000").replace("\\", "\\\\")):
        shardckpt.save({"x": PerRank(torch.ones(3)), "x\x000": torch.zeros(3)}, path)
    assert not (path / "index.json").exists()


@pytest.mark.parametrize("where", ["plain", "per-rank"])
def test_load_into_a_meta_tensor_is_refused(tmp_path, where):
    path = tmp_path / "ckpt"
    saved = torch.arange(4.0)
    shardckpt.save({"m": {"w": PerRank(saved) if where == "per-rank" else saved}}, path)
    meta = torch.empty(4, device="meta")
    with pytest.raises(StateMismatchError, match="'m/w'.*meta"):
        shardckpt.load({"m": {"w": PerRank(meta) if where == "per-rank" else meta}}, path)


# --- A: allocations follow the data files, not the index's word ---------------------------------

_ALLOCATION_LIMIT = 1 << 30


def _no_big_allocations(monkeypatch) -> list[int]:
    """Record the bytes of every torch.empty and refuse (without allocating) any over 1 GiB."""
    requested: list[int] = []
    real = torch.empty

    def empty(*size: object, **kwargs: object) -> torch.Tensor:
        shape = size[0] if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size) else size
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        assert isinstance(dtype, torch.dtype)
        requested.append(math.prod(shape) * dtype.itemsize)  # type: ignore[arg-type]
        if requested[-1] > _ALLOCATION_LIMIT:
            raise AssertionError(f"torch.empty of {requested[-1]} bytes before the data files were checked")
        return real(*size, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(torch, "empty", empty)
    return requested


@pytest.fixture
def inflated(tmp_path) -> Path:
    """A valid-looking index whose tensor "opt/huge" (256 GiB of uint8) is covered by 128 zstd
    blocks that each could expand 32768-fold, in a data file that the index says is 8 MiB longer
    than it is. Everything the index says is consistent; only the file's real size gives it away."""
    path = tmp_path / "src"
    shardckpt.save({"w": torch.ones(8), "opt": Holder({"step": 1, "m": torch.ones(2)})}, path)
    doc = json.loads((path / "index.json").read_bytes())
    f = doc["files"][0]
    start, stored, raw, n = f["size"], 1 << 16, 1 << 31, 128
    f["size"] = start + n * stored
    blocks = [[[k * raw], [raw], 0, start + k * stored, stored, raw, "zstd", "0" * 16] for k in range(n)]
    doc["tensors"].append({"key": "opt/huge", "path": ["opt", "huge"], "rank": None, "dtype": "uint8",
                           "shape": [n * raw], "blocks": blocks})
    (path / "index.json").write_bytes(json.dumps(doc).encode())
    return path


def test_load_checks_file_sizes_before_allocating(inflated, monkeypatch):
    requested = _no_big_allocations(monkeypatch)
    with pytest.raises(CorruptCheckpointError) as info:
        shardckpt.load({"w": torch.zeros(8), "opt": Holder({"step": 0})}, inflated)
    assert "data/" in str(info.value) and "truncated" in str(info.value)
    assert max(requested, default=0) <= _ALLOCATION_LIMIT


def test_convert_checks_file_sizes_before_allocating(inflated, tmp_path, monkeypatch, capsys):
    requested = _no_big_allocations(monkeypatch)
    assert cli(["convert", str(inflated), str(tmp_path / "dst")]) == 2
    assert "CorruptCheckpointError" in capsys.readouterr().err
    assert max(requested, default=0) <= _ALLOCATION_LIMIT
    assert not (tmp_path / "dst" / "index.json").exists()


def test_tensors_created_on_load_are_filled(tmp_path):
    """The deferred allocation of tensors that only the checkpoint has still loads them."""
    path = tmp_path / "ckpt"
    m = torch.randn(300, 40)
    shardckpt.save({"opt": Holder({"state": {0: {"m": m, "s": torch.tensor(2.0)}}, "e": torch.ones(0, 3)})}, path,
                   compression=shardckpt.CompressionOptions(block_bytes=4096))
    holder = Holder({"state": {}})
    shardckpt.load({"opt": holder}, path)
    got = holder.state
    assert torch.equal(got["state"][0]["m"], m) and got["state"][0]["s"].item() == 2.0  # type: ignore[index]
    assert got["e"].shape == (0, 3)  # type: ignore[union-attr]


# --- B: verify streams ---------------------------------------------------------------------------

# Peak RSS is read as VmHWM, not getrusage's ru_maxrss: a process started by fork + exec inherits
# the ru_maxrss of the forked copy of its parent (the whole test process), which would hide growth.
_VERIFY_RSS = textwrap.dedent(
    """
    import sys
    import shardckpt
    import shardckpt.api  # `import shardckpt` is lazy: load torch before measuring, it is not verify's memory

    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    before = kib("VmRSS")
    report = shardckpt.verify(sys.argv[1])
    print(report.blocks, (kib("VmHWM") - before) * 1024)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from /proc/self/status")
def test_verify_memory_does_not_grow_with_the_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    size = 96 << 20
    shardckpt.save({"w": torch.randn(size // 4)}, path,
                   compression=shardckpt.CompressionOptions(codec="none", block_bytes=64 << 10))
    # A fixed thread count: per-thread allocator arenas add a little RSS per thread.
    proc = subprocess.run([sys.executable, "-c", _VERIFY_RSS, str(path)], capture_output=True, text=True,
                          timeout=150, env={**os.environ, "SHARDCKPT_IO_THREADS": "4"})
    assert proc.returncode == 0, proc.stderr
    blocks, growth = map(int, proc.stdout.split())
    assert blocks == size // (64 << 10)
    assert growth < size // 4, f"verify's peak RSS grew by {growth >> 20} MiB for a {size >> 20} MiB checkpoint"


def test_verify_stops_at_the_first_corrupt_block(tmp_path):
    path = tmp_path / "ckpt"
    shardckpt.save({"w": torch.randn(64 << 10)}, path,
                   compression=shardckpt.CompressionOptions(codec="none", block_bytes=4096))
    data = next((path / "data").iterdir())
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="'w'") as info:
        shardckpt.verify(path)
    assert str(path) in str(info.value) and type(info.value) is not CheckpointError


@pytest.mark.parametrize(
    ("source", "kind"),
    [("garbage.pt", "CorruptCheckpointError"), ("missing.pt", "CheckpointNotFoundError")],
)
def test_convert_from_an_unreadable_torch_file(tmp_path, capsys, source, kind):
    (tmp_path / "garbage.pt").write_bytes(b"not a torch.save file")
    assert cli(["convert", str(tmp_path / source), str(tmp_path / "dst"), "--from", "torch"]) == 2
    err = capsys.readouterr().err
    assert f": {kind}: " in err and source in err, err


def test_every_cut_of_a_torch_save_file_is_a_corrupt_checkpoint_error(tmp_path):
    # Damaged files fail deep in torch.load with IndexError, struct.error, KeyError, ...: each must
    # reach the user as CorruptCheckpointError naming the file, in both of torch's formats.
    from shardckpt.interop.torch_save import read_torch_save

    state = {"w": torch.arange(12.0).reshape(3, 4), "step": 3, "nested": {"b": torch.ones(2, dtype=torch.bfloat16)}}
    for zipped in (True, False):
        whole = tmp_path / f"whole-{zipped}.pt"
        torch.save(state, whole, _use_new_zipfile_serialization=zipped)
        raw = whole.read_bytes()
        cuts = sorted({1, 18, 28, *range(0, len(raw), max(1, len(raw) // 60))})
        for cut in cuts:
            damaged = tmp_path / f"cut-{zipped}-{cut}.pt"
            damaged.write_bytes(raw[:cut])
            with pytest.raises(CorruptCheckpointError, match=str(damaged)):
                read_torch_save(damaged)
        assert torch.equal(read_torch_save(whole)["w"], state["w"])  # type: ignore[arg-type]
