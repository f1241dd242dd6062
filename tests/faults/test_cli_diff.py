"""shardckpt diff: which tensors and values differ and by how much; exit 0 same, 1 different, 2 error."""

from __future__ import annotations

import json
import math

import pytest
import torch

import shardckpt
from shardckpt.cli import main

pytestmark = pytest.mark.timeout(120)


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(1)
    return {"model": {"w": torch.randn(50, 20, generator=g), "b": torch.zeros(4, dtype=torch.bfloat16),
                      "ids": torch.arange(6)},
            "cfg": {"lr": 0.1, "betas": (0.9, 0.99), "nan": math.nan}, "step": 3}


def _diff(capsys, *argv: str) -> tuple[int, dict[str, object]]:
    code = main(["diff", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_same_checkpoints_exit_0(tmp_path, capsys):
    shardckpt.save(_state(), tmp_path / "a")
    shardckpt.save(_state(), tmp_path / "b", compression="none")  # other codec, same values
    code, doc = _diff(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 0 and doc["same"] is True and doc["tensors_compared"] == 3 and doc["values_compared"] == 2
    assert doc["tensors_changed"] == [] and doc["values_changed"] == [] and doc["only_in_a"] == []
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert " same " in capsys.readouterr().out


def test_every_kind_of_difference_is_reported(tmp_path, capsys):
    a = _state()
    shardckpt.save(a, tmp_path / "a")
    b = _state()
    b["model"]["w"] = a["model"]["w"].clone()
    b["model"]["w"][3, 4] += 0.5  # one element: abs 0.5
    b["model"]["b"] = torch.zeros(4, dtype=torch.float32)  # dtype change
    b["model"]["ids"] = torch.arange(7)  # shape change
    b["cfg"] = {"lr": 0.2, "betas": (0.9, 0.99), "nan": math.nan}
    b["extra"] = torch.ones(2)  # only in B
    del b["step"]  # only in A
    shardckpt.save(b, tmp_path / "b")
    code, doc = _diff(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1 and doc["same"] is False
    by_key = {r["key"]: r for r in doc["tensors_changed"]}
    w = by_key["model/w"]
    assert w["change"] == "values" and w["mismatched"] == 1 and w["elements"] == 1000
    expected_abs = abs(float(b["model"]["w"][3, 4].double() - a["model"]["w"][3, 4].double()))
    assert w["max_abs_diff"] == pytest.approx(expected_abs)
    assert w["max_rel_diff"] == pytest.approx(expected_abs / abs(float(b["model"]["w"][3, 4])))
    assert by_key["model/b"]["change"] == "dtype" and by_key["model/b"]["b"]["dtype"] == "float32"
    assert by_key["model/ids"]["change"] == "shape" and by_key["model/ids"]["b"]["shape"] == [7]
    assert [r["key"] for r in doc["values_changed"]] == ["cfg"]  # nan == nan; only lr changed
    assert doc["only_in_a"] == [{"key": "step", "rank": None, "kind": "value"}]
    assert doc["only_in_b"] == [{"key": "extra", "rank": None, "kind": "tensor"}]
    # Text form: one line per difference.
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "differs    tensor model/w: 1 of 1000 elements" in out and "only in A  value  step" in out


def test_tolerances_and_key_selection(tmp_path, capsys):
    a = _state()
    shardckpt.save(a, tmp_path / "a")
    b = _state()
    b["model"]["w"] = a["model"]["w"] * (1 + 1e-6)
    shardckpt.save(b, tmp_path / "b")
    assert _diff(capsys, str(tmp_path / "a"), str(tmp_path / "b"))[0] == 1  # bit for bit by default
    code, doc = _diff(capsys, str(tmp_path / "a"), str(tmp_path / "b"), "--rtol", "1e-5")
    assert code == 0 and doc["same"]
    code, doc = _diff(capsys, str(tmp_path / "a"), str(tmp_path / "b"), "--key", "cfg", "--key", "model/ids")
    assert code == 0 and doc["tensors_compared"] == 1 and doc["values_compared"] == 1


def test_nan_payloads_and_signed_zero(tmp_path, capsys):
    x = torch.tensor([0.0, float("nan"), 1.0])
    shardckpt.save({"x": x}, tmp_path / "a")
    shardckpt.save({"x": torch.tensor([-0.0, float("nan"), 1.0])}, tmp_path / "b")
    code, doc = _diff(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1 and doc["tensors_changed"][0]["mismatched"] == 1  # -0.0 differs bit for bit
    assert doc["tensors_changed"][0]["max_abs_diff"] == 0.0  # but not in value
    code, doc = _diff(capsys, str(tmp_path / "a"), str(tmp_path / "b"), "--atol", "1e-9")
    assert code == 0


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    shardckpt.save(_state(), tmp_path / "a")
    for argv, err_type in (([str(tmp_path / "a"), str(tmp_path / "missing")], "CheckpointNotFoundError"),
                           ([str(tmp_path / "a"), str(tmp_path / "a"), "--key", "nope"], "MissingKeysError"),
                           ([str(tmp_path / "a"), str(tmp_path / "a"), "--rtol", "-1"], "CheckpointError")):
        assert main(["diff", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"shardckpt diff: {err_type}:")
    # A corrupt block is an error (2), not a difference (1).
    shardckpt.save(_state(), tmp_path / "c")
    data = next((tmp_path / "c" / "data").iterdir())
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "CorruptCheckpointError" in capsys.readouterr().err


@pytest.mark.parametrize(("a", "b", "argv"), [
    (torch.tensor([1.0]), torch.tensor([math.inf]), ["--rtol", "1e-3"]),  # inf <= atol + rtol * inf held
    (torch.tensor([math.inf]), torch.tensor([-math.inf]), ["--rtol", "1e-3"]),
    (torch.tensor([2**53]), torch.tensor([2**53 + 1]), ["--atol", "0.5"]),  # equal in float64
    (torch.tensor([2**53]), torch.tensor([2**53 + 1]), []),
])
def test_differences_a_tolerance_or_float64_would_hide(tmp_path, capsys, a, b, argv):
    shardckpt.save({"x": a}, tmp_path / "a")
    shardckpt.save({"x": b}, tmp_path / "b")
    code, doc = _diff(capsys, str(tmp_path / "a"), str(tmp_path / "b"), *argv)
    assert code == 1 and doc["tensors_changed"][0]["mismatched"] == 1
    biggest = doc["tensors_changed"][0]["max_abs_diff"]
    assert biggest == "inf" or biggest >= 1  # strict JSON prints an infinity as "inf"
    shardckpt.save({"x": b}, tmp_path / "c")  # and the same tensor is still the same
    assert _diff(capsys, str(tmp_path / "b"), str(tmp_path / "c"), *argv)[0] == 0


@pytest.mark.parametrize(("a", "b"), [(1, 1.0), (True, 1), (0.0, -0.0), ([1, 0], [True, False])])
def test_values_python_calls_equal_but_a_load_tells_apart_differ(tmp_path, capsys, a, b):
    shardckpt.save({"v": a}, tmp_path / "a")
    shardckpt.save({"v": b}, tmp_path / "b")
    code, doc = _diff(capsys, str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 1 and [r["key"] for r in doc["values_changed"]] == ["v"]
    assert _diff(capsys, str(tmp_path / "a"), str(tmp_path / "a"))[0] == 0
