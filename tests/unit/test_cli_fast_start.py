"""``shardckpt --help``, ``ls`` and ``inspect`` only read JSON: they must not import torch (seconds
of start-up on a loaded machine). Checked in a fresh interpreter, by what it imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import shardckpt
from shardckpt.format.schema import DTYPE_ITEMSIZE, DTYPES, dtype_name

pytestmark = pytest.mark.timeout(120)

_RUN = """
import contextlib, io, json, sys
import shardckpt.cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = shardckpt.cli.main(json.loads(sys.argv[1]))
    except SystemExit as e:  # --help
        code = e.code
print(json.dumps({"code": code, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                  "out": out.getvalue()}))
"""


def _run(argv: list[str]) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(argv)], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_help_ls_and_inspect_do_not_import_torch(tmp_path):
    m = shardckpt.CheckpointManager(tmp_path / "root", async_save=False)
    m.save(4, {"w": torch.ones(3), "cfg": {"dtype": torch.bfloat16, "lr": 0.1}, "ids": torch.arange(2)})
    m.close()
    step = str(tmp_path / "root" / "step-00000004")
    for argv in (["--help"], ["ls", str(tmp_path / "root")], ["ls", "--json", str(tmp_path / "root")],
                 ["inspect", "--json", step], ["inspect", str(tmp_path / "missing")]):
        got = _run(argv)
        assert got["torch"] == [], f"{argv} imported {got['torch'][:5]}"
        assert got["code"] == (2 if "missing" in argv[-1] else 0), argv
    assert json.loads(_run(["inspect", "--json", step])["out"])["values"]["cfg"]["dtype"] == {"$dtype": "bfloat16"}


def test_import_shardckpt_is_lazy_and_every_public_name_resolves():
    code = ("import sys, shardckpt; assert 'torch' not in sys.modules, 'import shardckpt imported torch'; "
            "[getattr(shardckpt, n) for n in shardckpt.__all__]; assert 'torch' in sys.modules; "
            "assert shardckpt.read_index is __import__('shardckpt.api').api.read_index; "
            # Importing the submodule shardckpt.async_save must leave the function under that name.
            "import shardckpt.manager; assert shardckpt.async_save.__name__ == 'async_save' and "
            "callable(shardckpt.async_save)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert set(dir(shardckpt)) >= set(shardckpt.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shardckpt.nope  # noqa: B018


def test_torch_free_dtype_table_matches_torch():
    assert set(DTYPE_ITEMSIZE) == set(DTYPES)
    for name, size in DTYPE_ITEMSIZE.items():
        assert DTYPES[name].itemsize == size and dtype_name(DTYPES[name]) == name
    assert dtype_name(torch.complex32) is None
