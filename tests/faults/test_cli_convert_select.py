"""shardckpt convert: key selection (--key, --drop), per-rank entries (kept per rank, or
--drop-per-rank), and --dtype; bit-exact wherever nothing is cast."""

from __future__ import annotations

import json

import pytest
import torch

import shardckpt
from shardckpt.cli import main
from tests.dist.harness import run_ranks

pytestmark = pytest.mark.timeout(240)


def _source(path) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(64, 8, generator=g), "b": torch.randn(8, generator=g).to(torch.bfloat16),
                       "ids": torch.arange(5)},
             "optim": {"m": torch.randn(64, 8, generator=g), "lr": 0.5},
             "extra": {"note": "x", "t": torch.ones(3)}, "step": 7}
    shardckpt.save(state, path, metadata={"run": "a"})
    return state


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_key_and_drop_keep_exactly_the_selected_subtrees(tmp_path, capsys):
    src = _source(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--key", "model", "--key", "step",
                 "--drop", "model/ids", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tensors"] == 2 and doc["values"] == 1 and doc["world_size"] == 1 and doc["dtype"] is None
    got = shardckpt.load_all(tmp_path / "dst")
    assert set(got) == {"model", "step"} and set(got["model"]) == {"w", "b"} and got["step"] == 7
    for k in ("w", "b"):
        assert got["model"][k].dtype == src["model"][k].dtype and _bits(got["model"][k]) == _bits(src["model"][k])
    assert shardckpt.read_index(tmp_path / "dst").metadata == {"run": "a"}


def test_unknown_key_or_drop_is_a_clean_error(tmp_path, capsys):
    _source(tmp_path / "src")
    for extra in (["--key", "modle"], ["--drop", "model/nope"]):
        assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *extra]) == 2
        err = capsys.readouterr().err
        assert "MissingKeysError" in err and extra[1] in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "dst" / "index.json").exists()


def test_dtype_casts_floating_tensors_only(tmp_path):
    src = _source(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bf16", "-q"]) == 0
    got = shardckpt.load_all(tmp_path / "dst")
    assert got["model"]["w"].dtype == torch.bfloat16
    assert torch.equal(got["model"]["w"], src["model"]["w"].to(torch.bfloat16))
    assert got["model"]["ids"].dtype == torch.int64 and torch.equal(got["model"]["ids"], src["model"]["ids"])
    assert got["optim"]["lr"] == 0.5


def test_convert_from_torch_save_selects_and_casts(tmp_path):
    w = torch.randn(4, 3)
    torch.save({"model": {"w": w, "n": torch.arange(3)}, "optim": {"m": torch.ones(2)}, "step": 2}, tmp_path / "t.pt")
    assert main(["convert", "--from", "torch", str(tmp_path / "t.pt"), str(tmp_path / "dst"), "--key", "model",
                 "--key", "step", "--dtype", "fp16"]) == 0
    got = shardckpt.load_all(tmp_path / "dst")
    assert set(got) == {"model", "step"} and torch.equal(got["model"]["w"], w.to(torch.float16))
    assert got["model"]["n"].dtype == torch.int64
    assert main(["convert", "--from", "torch", str(tmp_path / "t.pt"), str(tmp_path / "d2"), "--drop", "nope"]) == 2


def _save_with_rng(rank: int, world: int, path: str) -> None:
    torch.manual_seed(100 + rank)
    state = {"model": {"w": torch.arange(12.0).reshape(3, 4)}, "rng": shardckpt.RNGState(seed=1),
             "pos": shardckpt.PerRank({"index": 10 * rank + 3}), "step": 5}
    shardckpt.save(state, path)


def test_per_rank_entries_are_kept_per_rank_or_dropped(tmp_path, capsys):
    # The README's RNGState, saved at 2 ranks: convert failed on it before ("is per-rank").
    run_ranks(2, _save_with_rng, str(tmp_path / "src"))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "kept"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["world_size"] == 2 and doc["per_rank_tensors"] > 0 and doc["per_rank_values"] > 0
    before = shardckpt.load_all(tmp_path / "src")
    after = shardckpt.load_all(tmp_path / "kept")
    assert isinstance(after["pos"], shardckpt.ByRank) and after["pos"] == {0: {"index": 3}, 1: {"index": 13}}
    rs_before, rs_after = before["rng"]["rank_state"], after["rng"]["rank_state"]
    for part in ("torch",):
        for rank in (0, 1):
            assert _bits(rs_after[part][rank]) == _bits(rs_before[part][rank])
    assert _bits(rs_after["torch"][0]) != _bits(rs_after["torch"][1])  # each rank's own stream
    assert torch.equal(after["model"]["w"], before["model"]["w"]) and after["step"] == 5

    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dropped"), "--drop-per-rank"]) == 0
    index = shardckpt.read_index(tmp_path / "dropped")
    assert index.world_size == 1 and all(e.rank is None for e in [*index.tensors, *index.values])
    assert {t.key for t in index.tensors} == {"model/w"}


def test_a_failing_rank_fails_the_convert_without_a_hang(tmp_path, capsys):
    # The per-rank convert spawns one process per saving rank; corrupt rank 1's data file so that
    # a rank fails while reading, before the collective save its peer is already waiting in.
    run_ranks(2, _save_with_rng, str(tmp_path / "src"))
    index = shardckpt.read_index(tmp_path / "src")
    data = tmp_path / "src" / next(f.name for f in index.files if f.rank == 1)
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CorruptCheckpointError" in err and "rank" in err
    assert not (tmp_path / "dst" / "index.json").exists()


@pytest.mark.timeout(60)
def test_a_world_size_field_never_starts_more_processes_than_allowed(tmp_path, capsys, monkeypatch):
    # A hostile index: world_size 2^24 and one per-rank value at its last rank. Keeping per-rank
    # entries writes them from one process per rank; that many are refused before any starts.
    shardckpt.save({"w": torch.ones(4), "step": 1}, tmp_path / "src")
    doc = json.loads((tmp_path / "src" / "index.json").read_text())
    doc["world_size"] = 1 << 24
    doc["values"].append({"key": "rng", "path": ["rng"], "rank": (1 << 24) - 1, "value": 7})
    (tmp_path / "src" / "index.json").write_text(json.dumps(doc))
    import shardckpt.cli.convert as convert

    started: list[int] = []
    monkeypatch.setattr(convert, "_spawn_ranks", lambda world, job: started.append(world) or {})
    dst = str(tmp_path / "dst")
    assert main(["convert", str(tmp_path / "src"), dst]) == 2
    err = capsys.readouterr().err
    assert "StateMismatchError" in err and "16777216 processes" in err and "--drop-per-rank" in err
    assert main(["convert", str(tmp_path / "src"), dst, "--max-ranks", "100"]) == 2
    assert started == [] and not (tmp_path / "dst").exists()
    assert main(["convert", str(tmp_path / "src"), dst, "--drop-per-rank"]) == 0  # the global state only
    got = shardckpt.load_all(dst)
    assert set(got) == {"w", "step"} and torch.equal(got["w"], torch.ones(4)) and got["step"] == 1
