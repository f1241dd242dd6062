"""The shardckpt command over real checkpoints: ls, inspect, verify (and its exit code), convert.

The tests that take a ``place`` run on a local directory and on a moto S3 prefix (tests/backends.py);
the CLI reads the AWS environment, which the fixture points at the server. The DCP and torch.save
sources of ``convert --from`` are local files by nature (torch reads them); their destination runs
on both."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import shardckpt
from shardckpt.cli import main
from tests.backends import Place


def _ckpt(path) -> dict[str, object]:
    state = {"model": {"w": torch.randn(300, 40).to(torch.bfloat16), "b": torch.arange(7)}, "step": 9,
             "cfg": {"lr": 0.5, "betas": (0.9, 0.99)}}
    shardckpt.save(state, path, metadata={"step": 9})
    return state


def test_ls_inspect_verify(place: Place, capsys):
    m = shardckpt.CheckpointManager(place.at("root"), async_save=False)
    for s in (3, 6):
        m.save(s, {"w": torch.ones(10) * s})
    assert main(["ls", str(place.at("root"))]) == 0
    out = capsys.readouterr().out
    assert "step          3" in out and "step          6" in out
    _ckpt(place.at("c"))
    assert main(["inspect", str(place.at("c")), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {t["key"] for t in doc["tensors"]} == {"model/w", "model/b"} and doc["values"]["step"] == 9
    assert main(["verify", str(place.at("c"))]) == 0
    (data,) = place.files("c/data")
    place.flip(data, -3)
    assert main(["verify", str(place.at("c"))]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_convert_changes_compression_and_keeps_values(place: Place):
    state = _ckpt(place.at("src"))
    proc = subprocess.run([sys.executable, "-m", "shardckpt.cli", "convert", str(place.at("src")), str(place.at("dst")),
                           "--compression", "none"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    index = shardckpt.read_index(place.at("dst"))
    assert {b.codec for t in index.tensors for b in t.blocks} == {"raw"} and index.metadata == {"step": 9}
    got = {"model": {"w": torch.zeros(300, 40, dtype=torch.bfloat16), "b": torch.zeros(7, dtype=torch.int64)},
           "step": 0, "cfg": None}
    shardckpt.load(got, place.at("dst"))
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["cfg"] == {"lr": 0.5, "betas": (0.9, 0.99)}


def test_missing_checkpoint_is_a_clean_error(place: Place, capsys):
    assert main(["inspect", str(place.at("nope"))]) == 2
    assert "CheckpointNotFoundError" in capsys.readouterr().err


def test_convert_from_dcp_and_torch_save(tmp_path, place: Place):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.randn(6, 5), "b": torch.arange(4)}, "step": 3}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    torch.save({"w": state["model"]["w"], "n": 2}, tmp_path / "t.pt")
    assert main(["convert", "--from", "dcp", str(tmp_path / "dcp"), str(place.at("a"))]) == 0
    assert main(["convert", "--from", "torch", str(tmp_path / "t.pt"), str(place.at("b"))]) == 0
    got = {"model": {"w": torch.zeros(6, 5), "b": torch.zeros(4, dtype=torch.int64)}, "step": 0}
    shardckpt.load(got, place.at("a"))
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["step"] == 3
    got2 = {"w": torch.zeros(6, 5), "n": 0}
    shardckpt.load(got2, place.at("b"))
    assert torch.equal(got2["w"], state["model"]["w"]) and got2["n"] == 2
    assert main(["convert", "--from", "dcp", str(tmp_path / "nowhere"), str(place.at("c"))]) == 2


def test_convert_of_a_source_whose_paths_clash_is_a_clear_error():
    # A source (a torch.save dict, a hostile index) may name "a" and "a/b": no state holds both.
    import pytest

    from shardckpt.cli import _put

    for first, second in ((("a",), ("a", "b")), (("a", "b"), ("a",)), (("a", "b"), ("a", "b", "c"))):
        state: dict[str, object] = {}
        _put(state, first, 1)
        with pytest.raises(shardckpt.CorruptCheckpointError, match="cannot both exist"):
            _put(state, second, 2)
