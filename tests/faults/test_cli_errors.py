"""Errors a user can act on: a DCP directory names the convert command; a value the format cannot
hold names the key and what to pass; torch.dtype values round-trip."""

from __future__ import annotations

import pytest
import torch

import shardckpt
from shardckpt.cli import main

pytestmark = pytest.mark.timeout(120)


def test_a_dcp_directory_names_the_convert_command(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    hint = "shardckpt convert --from dcp"
    for call in (lambda: shardckpt.read_index(tmp_path / "dcp"), lambda: shardckpt.load({"w": torch.zeros(3)}, tmp_path / "dcp"),
                 lambda: shardckpt.load_all(tmp_path / "dcp"), lambda: shardckpt.verify(tmp_path / "dcp")):
        with pytest.raises(shardckpt.CheckpointNotFoundError, match="DCP") as e:
            call()
        assert hint in str(e.value) and str(tmp_path / "dcp") in str(e.value)
    assert main(["inspect", str(tmp_path / "dcp")]) == 2
    assert hint in capsys.readouterr().err
    # An empty directory is still "no checkpoint", with no DCP hint.
    (tmp_path / "empty").mkdir()
    with pytest.raises(shardckpt.CheckpointNotFoundError) as e:
        shardckpt.read_index(tmp_path / "empty")
    assert "DCP" not in str(e.value)


def test_a_config_object_says_what_to_pass(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    what = r"key 'meta' holds at \['config'\] a value that has type LlamaConfig.*pass config\.to_dict\(\)"
    with pytest.raises(shardckpt.StateMismatchError, match=what):
        shardckpt.save({"meta": {"config": cfg}, "w": torch.ones(2)}, tmp_path / "c")
    assert not (tmp_path / "c" / "index.json").exists()
    # What the message says to pass round-trips exactly (torch_dtype included).
    d = cfg.to_dict()
    shardckpt.save({"config": d}, tmp_path / "ok")
    assert shardckpt.load_all(tmp_path / "ok")["config"] == d


def test_dataclass_and_enum_values_get_their_hint(tmp_path):
    import dataclasses
    import enum

    @dataclasses.dataclass
    class Opts:
        lr: float = 0.1

    class Mode(enum.Enum):
        A = 1

    with pytest.raises(shardckpt.StateMismatchError, match=r"dataclasses\.asdict\(opts\)"):
        shardckpt.save({"opts": Opts()}, tmp_path / "a")
    with pytest.raises(shardckpt.StateMismatchError, match=r"mode\.value"):
        shardckpt.save({"mode": Mode.A}, tmp_path / "b")


def test_torch_dtype_values_round_trip(tmp_path):
    cfg = {"torch_dtype": torch.bfloat16, "all": [torch.float32, torch.int8, torch.complex64, torch.float8_e5m2],
           "by_dtype": {torch.float16: "half"}, "pair": (torch.bool, 1)}
    shardckpt.save({"cfg": cfg, "w": torch.ones(2)}, tmp_path / "c")
    got = {"cfg": None, "w": torch.zeros(2)}
    shardckpt.load(got, tmp_path / "c")
    assert got["cfg"] == cfg and got["cfg"]["torch_dtype"] is torch.bfloat16
    assert shardckpt.load_all(tmp_path / "c")["cfg"] == cfg


@pytest.mark.parametrize("body", ["Tensor", "nn", "float32;", "", 3, "__class__", "manual_seed"])
def test_a_hostile_dtype_tag_is_an_index_error(body):
    from shardckpt.format.values import decode_value

    with pytest.raises(shardckpt.IndexFormatError):
        decode_value({"$dtype": body}, "index.json")


@pytest.mark.parametrize("argv", [["inspect", "--limit", "-5"], ["inspect", "--limit", "x"],
                                  ["convert", "--max-ranks", "-1", "DST"]])
def test_a_count_argument_below_zero_is_a_usage_error(tmp_path, capsys, argv):
    shardckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    args = [*argv[:1], str(tmp_path / "c"), *argv[1:]]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "expected a whole number >= 0" in capsys.readouterr().err
