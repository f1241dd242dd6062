"""Bad input to load_all and export: each is a CheckpointError subclass that names the path or key
and says what to do, from the API and as a one-line error with exit code 2 from the CLI; a failing
export leaves no partial file under a final name."""

from __future__ import annotations

import pytest
import torch

import shardckpt
from shardckpt.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "c"
    shardckpt.save({"model": {"w": torch.randn(200, 50), "b": torch.arange(7)}, "step": 2,
                    "rng": shardckpt.PerRank(torch.arange(4))}, path)
    return path


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["export", *argv])
    err = capsys.readouterr().err
    return code, err


def test_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(shardckpt.CheckpointNotFoundError, match="nope"):
        shardckpt.export_safetensors(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.load_all(tmp_path / "nope")
    code, err = _cli(capsys, str(tmp_path / "nope"), str(tmp_path / "out"))
    assert code == 2 and err.startswith("shardckpt export: CheckpointNotFoundError:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unknown_key(ckpt, tmp_path, capsys):
    with pytest.raises(shardckpt.MissingKeysError, match=r"'modle'.*top-level keys: model, rng, step"):
        shardckpt.export_safetensors(ckpt, tmp_path / "out", key="modle")
    code, err = _cli(capsys, str(ckpt), str(tmp_path / "out"), "--key", "modle")
    assert code == 2 and "MissingKeysError" in err and "'modle'" in err


def test_out_holding_an_export_needs_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    shardckpt.export_safetensors(ckpt, out, key="model")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(shardckpt.ExportError, match=r"already holds an export \(model.safetensors\).*--overwrite"):
        shardckpt.export_safetensors(ckpt, out, key="model", dtype="bf16")
    code, err = _cli(capsys, str(ckpt), str(out), "--key", "model", "--dtype", "bf16")
    assert code == 2 and "ExportError" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == before  # untouched
    assert _cli(capsys, str(ckpt), str(out), "--key", "model", "--dtype", "bf16", "--overwrite")[0] == 0
    assert (out / "model.safetensors").read_bytes() != before


@pytest.mark.parametrize("size", ["5 gigs", "GB", "-1", "0", "1e9"])
def test_bad_size_string(ckpt, tmp_path, capsys, size):
    with pytest.raises(shardckpt.ExportError, match="max shard size"):
        shardckpt.export_safetensors(ckpt, tmp_path / "out", max_shard_size=size)
    code, err = _cli(capsys, str(ckpt), str(tmp_path / "out"), "--max-shard-size", size)
    assert code == 2 and "ExportError" in err and repr(size) in err
    assert not (tmp_path / "out").exists()


def test_bad_options(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(shardckpt.ExportError, match="'int4' is not one of bf16, fp16, fp32"):
        shardckpt.export_safetensors(ckpt, out, dtype="int4")
    with pytest.raises(shardckpt.ExportError, match="prefix_strip 'module.' begins no tensor name"):
        shardckpt.export_safetensors(ckpt, out, key="model", prefix_strip="module.")
    with pytest.raises(shardckpt.ExportError, match="nothing to export under 'rng'.*per-rank tensors: 1"):
        shardckpt.export_safetensors(ckpt, out, key="rng")
    with pytest.raises(shardckpt.ExportError, match="tie 'x' -> 'w'"):
        shardckpt.export_safetensors(ckpt, out, key="model", tied={"x": "w"})
    with pytest.raises(shardckpt.ExportError, match="differ in dtype or shape"):
        shardckpt.export_safetensors(ckpt, out, key="model", tied={"b": "w"})
    with pytest.raises(shardckpt.ExportError, match="is, or is inside, the checkpoint"):
        shardckpt.export_safetensors(ckpt, ckpt / "hf")
    with pytest.raises(shardckpt.ExportError, match="is a URL"):
        shardckpt.export_safetensors(ckpt, "s3://bucket/hf")
    (tmp_path / "file").write_text("x")
    with pytest.raises(shardckpt.ExportError, match="not a directory"):
        shardckpt.export_safetensors(ckpt, tmp_path / "file")
    with pytest.raises(shardckpt.StateMismatchError, match="per_rank"):
        shardckpt.load_all(ckpt, per_rank="all")  # type: ignore[arg-type]
    code, err = _cli(capsys, str(ckpt), str(out), "--tie", "lm_head.weight")
    assert code == 2 and "LATER=FIRST" in err
    with pytest.raises(SystemExit) as e:  # argparse: a usage error, also exit code 2
        main(["export", str(ckpt), str(out), "--dtype", "int4"])
    assert e.value.code == 2
    assert not out.exists()


def test_tie_of_different_values_is_refused(tmp_path):
    shardckpt.save({"m": {"a": torch.ones(3, 2), "b": torch.ones(3, 2), "c": torch.zeros(3, 2)}}, tmp_path / "c")
    with pytest.raises(shardckpt.ExportError, match="'c' -> 'a'.*different values"):
        shardckpt.export_safetensors(tmp_path / "c", tmp_path / "out", key="m", tied={"c": "a"})
    assert not (tmp_path / "out").exists()
    with pytest.raises(shardckpt.ExportError, match="chain"):
        shardckpt.export_safetensors(tmp_path / "c", tmp_path / "out", key="m", tied={"c": "b", "b": "a"})


def test_names_that_clash_and_dtypes_safetensors_lacks(tmp_path):
    shardckpt.save({"a": {"b.c": torch.ones(1)}, "a.b": {"c": torch.ones(1)}}, tmp_path / "c")
    with pytest.raises(shardckpt.ExportError, match="'a.b/c' and 'a/b.c' are both named 'a.b.c'"):
        shardckpt.export_safetensors(tmp_path / "c", tmp_path / "out")
    shardckpt.save({"z": torch.ones(2, dtype=torch.complex64)}, tmp_path / "d")
    with pytest.raises(shardckpt.ExportError, match="'z' has dtype complex64"):
        shardckpt.export_safetensors(tmp_path / "d", tmp_path / "out")


@pytest.mark.parametrize("name", ["__metadata__", ""])
def test_a_name_safetensors_reserves_or_cannot_read_back_is_refused(tmp_path, capsys, name):
    shardckpt.save({"model": {name: torch.ones(2), "w": torch.zeros(3)}}, tmp_path / "c")
    with pytest.raises(shardckpt.ExportError, match=f"would be named {name!r} in the export"):
        shardckpt.export_safetensors(tmp_path / "c", tmp_path / "out", key="model")
    code, err = _cli(capsys, str(tmp_path / "c"), str(tmp_path / "out"), "--key", "model")
    assert code == 2 and "ExportError" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    # Named under its parent, it exports and reads back.
    shardckpt.export_safetensors(tmp_path / "c", tmp_path / "out")
    got = shardckpt.read_safetensors(tmp_path / "out")
    assert torch.equal(got[f"model.{name}"], torch.ones(2)) and torch.equal(got["model.w"], torch.zeros(3))


def _data_file(ckpt):
    return next((ckpt / "data").iterdir())


def test_truncated_data_file_fails_before_anything_is_written_or_allocated(ckpt, tmp_path):
    f = _data_file(ckpt)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(shardckpt.CorruptCheckpointError, match="truncated"):
        shardckpt.export_safetensors(ckpt, tmp_path / "out", key="model")
    assert not (tmp_path / "out").exists()
    with pytest.raises(shardckpt.CorruptCheckpointError, match="truncated"):
        shardckpt.load_all(ckpt, ["model"])


def test_corrupt_block_leaves_no_partial_file(ckpt, tmp_path):
    block = next(t for t in shardckpt.read_index(ckpt).tensors if t.key == "model/w").blocks[-1]
    f = _data_file(ckpt)
    raw = bytearray(f.read_bytes())
    raw[block.offset + block.length // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(shardckpt.CorruptCheckpointError, match="checksum mismatch"):
        shardckpt.export_safetensors(ckpt, tmp_path / "out", key="model")
    assert list((tmp_path / "out").iterdir()) == []  # the temporary file is removed
