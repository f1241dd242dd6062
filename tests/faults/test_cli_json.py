"""--json on every command (one JSON document on stdout, the keys docs/cli.md lists), one-line
errors on stderr with their exit codes, and progress bars only on a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch

import shardckpt
from shardckpt.cli import main

pytestmark = pytest.mark.timeout(180)


def _json(capsys, argv: list[str], code: int) -> dict[str, object]:
    assert main(argv) == code, argv
    captured = capsys.readouterr()
    return json.loads(captured.out)


def _ckpt(path) -> None:
    shardckpt.save({"model": {"w": torch.randn(40, 10), "b": torch.arange(3)}, "step": 2}, path, metadata={"k": 1})


def test_ls_json_reports_steps_and_unreadable_ones(tmp_path, capsys):
    m = shardckpt.CheckpointManager(tmp_path / "root", async_save=False)
    for s in (1, 2):
        m.save(s, {"w": torch.ones(4) * s})
    m.close()
    doc = _json(capsys, ["ls", "--json", str(tmp_path / "root")], 0)
    assert list(doc) == ["root", "steps"] and [r["step"] for r in doc["steps"]] == [1, 2]
    assert set(doc["steps"][0]) == {"step", "path", "world_size", "tensors", "values", "bytes_raw", "bytes_stored",
                                    "save_id"}
    (tmp_path / "root" / "step-00000002" / "index.json").write_text("{not json")
    doc = _json(capsys, ["ls", "--json", str(tmp_path / "root")], 1)
    assert doc["steps"][1]["error"]["type"] == "IndexFormatError" and "tensors" not in doc["steps"][1]
    assert _json(capsys, ["ls", "--json", str(tmp_path / "empty")], 0)["steps"] == []


def test_inspect_verify_json_and_exit_codes(tmp_path, capsys):
    _ckpt(tmp_path / "c")
    doc = _json(capsys, ["inspect", "--json", str(tmp_path / "c")], 0)
    assert list(doc) == ["path", "format_version", "save_id", "world_size", "files", "bytes_raw", "bytes_stored",
                         "blocks_by_codec", "metadata", "tensors", "values"]
    doc = _json(capsys, ["verify", "--json", str(tmp_path / "c")], 0)
    assert doc["ok"] is True and doc["exit_code"] == 0 and doc["results"][0]["tensors"] == 2
    (tmp_path / "c" / "data" / "0000-r0.bin").write_bytes(b"left by a torn save")
    doc = _json(capsys, ["verify", "--json", str(tmp_path / "c")], 3)
    assert doc["results"][0]["orphans"] == ["data/0000-r0.bin"]
    _ckpt(tmp_path / "bad")
    data = next((tmp_path / "bad" / "data").iterdir())
    raw = bytearray(data.read_bytes())
    raw[-2] ^= 0xFF
    data.write_bytes(bytes(raw))
    doc = _json(capsys, ["verify", "--json", str(tmp_path / "c"), str(tmp_path / "bad"), str(tmp_path / "no")], 1)
    assert [r["ok"] for r in doc["results"]] == [True, False, False] and doc["exit_code"] == 1
    assert doc["results"][1]["error"]["type"] == "CorruptCheckpointError"
    assert doc["results"][2]["error"]["type"] == "CheckpointNotFoundError"


def test_convert_and_export_json(tmp_path, capsys):
    _ckpt(tmp_path / "c")
    doc = _json(capsys, ["convert", "--json", str(tmp_path / "c"), str(tmp_path / "d"), "--compression", "none"], 0)
    assert list(doc) == ["src", "dst", "from", "world_size", "tensors", "values", "per_rank_tensors",
                         "per_rank_values", "bytes_raw", "bytes_stored", "dtype"]
    assert doc["tensors"] == 2 and doc["values"] == 1 and doc["bytes_raw"] == doc["bytes_stored"]
    doc = _json(capsys, ["export", "--json", str(tmp_path / "c"), str(tmp_path / "hf"), "--key", "model"], 0)
    assert doc["tensors"] == 2 and doc["files"] == ["model.safetensors"]


def test_errors_are_one_line_and_a_json_document(tmp_path, capsys):
    _ckpt(tmp_path / "c")
    cases = [
        (["inspect", str(tmp_path / "nope")], "CheckpointNotFoundError"),
        (["convert", str(tmp_path / "c"), str(tmp_path / "c" / "inside")], "CheckpointError"),
        (["export", str(tmp_path / "c"), str(tmp_path / "hf"), "--key", "nope"], "MissingKeysError"),
        (["export", str(tmp_path / "c"), str(tmp_path / "hf"), "--max-shard-size", "5 gigs"], "ExportError"),
        (["ls", "ftp://host/root"], "UnsupportedStorageError"),
    ]
    for argv, err_type in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"shardckpt {argv[0]}: {err_type}: "), err
        assert captured.out == ""
        doc = _json(capsys, [*argv, "--json"], 2)
        assert doc == {"error": {"type": err_type, "message": doc["error"]["message"]}} and doc["error"]["message"]
    with pytest.raises(SystemExit) as e:  # usage errors: argparse's exit code 2
        main(["export", str(tmp_path / "c"), str(tmp_path / "hf"), "--dtype", "int4"])
    assert e.value.code == 2


_RUN_ALL = """
import json, sys
from shardckpt.cli import main
for argv in json.loads(sys.argv[1]):
    print("@@", file=sys.stderr, flush=True)
    assert main(argv) in (0, 1), argv
"""


def _stderr_through_a_terminal(*runs: list[str]) -> list[bytes]:
    """Run the commands in one process (one torch import) with stderr on a real pseudo-terminal;
    return what reached the terminal during each."""
    master, slave = pty.openpty()
    # A terminal 100 columns wide: a new pty has 0, and tqdm draws nothing in no columns.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", _RUN_ALL, json.dumps(runs)], stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=120) == 0, seen
    os.close(master)
    return [part.strip() for part in seen.split(b"@@")[1:]]


def test_progress_bars_only_on_a_terminal(tmp_path):
    _ckpt(tmp_path / "c")
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    shown = _stderr_through_a_terminal(["verify", c], ["convert", c, d], ["diff", c, d],
                                       ["export", c, str(tmp_path / "hf")])
    for name, out in zip(("verify", "convert", "diff", "export"), shown, strict=True):
        assert name.encode() in out and b"|" in out, (name, out)
    quiet = _stderr_through_a_terminal(["verify", "--quiet", c], ["convert", "-q", c, d, "--overwrite"],
                                       ["diff", "--json", c, d], ["export", "--json", c, str(tmp_path / "hf2")])
    assert quiet == [b""] * 4
    proc = subprocess.run([sys.executable, "-m", "shardckpt.cli", "verify", c], capture_output=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == b""  # a pipe is not a terminal


def _strict(text: str) -> object:
    """``text`` parsed as strict JSON: no NaN or Infinity, no member named twice."""
    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        assert len({k for k, _ in items}) == len(items), f"a member named twice in {items}"
        return dict(items)

    def constant(name: str) -> object:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


@pytest.mark.parametrize("metadata", [{"k": {(1, 2): "v"}}, {"lr": float("nan"), "top": float("-inf")},
                                      {"m": {0: "a", "0": "b"}}, {"d": torch.bfloat16, "t": (1, [2, 3])}])
def test_inspect_json_prints_any_metadata_a_save_takes_as_strict_json(tmp_path, capsys, metadata):
    from shardckpt.format.values import decode_value

    shardckpt.save({"w": torch.ones(2)}, tmp_path / "c", metadata=metadata)
    assert main(["inspect", "--json", str(tmp_path / "c")]) == 0
    doc = _strict(capsys.readouterr().out)
    got = decode_value(doc["metadata"], "x")  # type: ignore[index]
    assert repr(got) == repr(metadata)  # nan != nan, so compared as text
