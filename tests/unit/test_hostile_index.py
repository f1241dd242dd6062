"""Hostile index.json files that parse: every one must come out of ``read_index``, ``load``,
``verify`` and the ``inspect`` and ``convert`` commands as a specific CheckpointError subclass
naming the checkpoint path (and the key where one is to blame), never as a raw exception, a huge
allocation or a silent success.

Covers issue 10: index-level bounds on what blocks may claim (file ranges, codec expansion,
coverage), keys that cannot be printed or that collide with internal names, ints outside 64 bits,
shapes whose strides overflow, and index bytes that are not strict UTF-8.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import CheckpointError, IncompleteCheckpointError, IndexFormatError, errors
from shardckpt.cli import main as cli
from shardckpt.codec.limits import ZSTD_MAX_RATIO
from tests.stateful import Holder

pytestmark = pytest.mark.timeout(120)




W = (torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 1000).to(torch.bfloat16)
B = torch.arange(10, dtype=torch.int64) * 7
M = torch.linspace(-1, 1, 48)


def _target() -> dict[str, object]:
    return {"b": torch.zeros(10, dtype=torch.int64), "w": torch.zeros(64, 64, dtype=torch.bfloat16),
            "step": 0, "sched": Holder({"last": 0})}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "ckpt"
    state = {"b": B.clone(), "w": W.clone(), "step": 3, "sched": Holder({"last": 5, "m": M.clone()})}
    shardckpt.save(state, path, compression=shardckpt.CompressionOptions(block_bytes=4096))
    return path


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(pristine, path)
    return path


def _doc(path: Path) -> dict:
    return json.loads((path / "index.json").read_bytes())


def _write(path: Path, doc: dict) -> None:
    # json.dumps escapes every non-ASCII character, lone surrogates included ("\ud800").
    (path / "index.json").write_bytes(json.dumps(doc).encode())


def _tensor(doc: dict, key: str) -> dict:
    return next(t for t in doc["tensors"] if t["key"] == key)


def _data_file(path: Path, doc: dict) -> Path:
    return path / doc["files"][0]["name"]


def test_pristine_loads_and_materializes(ckpt):
    """The fixture is valid, and "sched/m" (absent from the target's state_dict) is created on load."""
    target = _target()
    shardckpt.load(target, ckpt)
    shardckpt.verify(ckpt)
    assert torch.equal(target["w"], W) and torch.equal(target["b"], B)
    sched = target["sched"]
    assert isinstance(sched, Holder) and sched.state["last"] == 5 and torch.equal(sched.state["m"], M)


def _expect_rejected(ckpt: Path, kind: type[CheckpointError], fragment: str, capsys, tmp_path: Path) -> None:
    """Every reader raises a specific subclass of ``kind`` naming the path and ``fragment``."""
    calls: dict[str, Callable[[], object]] = {
        "read_index": lambda: shardckpt.read_index(ckpt),
        "load": lambda: shardckpt.load(_target(), ckpt),
        "verify": lambda: shardckpt.verify(ckpt),
    }
    for name, call in calls.items():
        with pytest.raises(CheckpointError) as info:
            call()
        err = info.value
        assert isinstance(err, kind), f"{name}: {type(err).__name__}: {err}"
        assert type(err) is not CheckpointError, f"{name}: unspecific {err}"
        assert str(ckpt) in str(err) and fragment in str(err), f"{name}: {err}"
    for argv in (["inspect", str(ckpt)], ["inspect", str(ckpt), "--json"],
                 ["convert", str(ckpt), str(tmp_path / "converted")]):
        capsys.readouterr()
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err  # "shardckpt COMMAND: ErrorName: message"
        raised = getattr(errors, err.split(": ")[1], None)
        assert isinstance(raised, type) and issubclass(raised, kind) and raised is not CheckpointError, err
        assert fragment in err, err
    assert not (tmp_path / "converted" / "index.json").exists()


# --- A: what blocks may claim is bounded by the stored bytes --------------------------------------


def _alias_of_b(doc: dict) -> None:
    """A second tensor whose block is b's stored bytes: one payload "covering" two tensors (with
    enough aliases, one small payload covers terabytes)."""
    alias = copy.deepcopy(_tensor(doc, "b"))
    alias.update(key="sched/alias", path=["sched", "alias"])
    doc["tensors"].append(alias)


def _inside_other_block(doc: dict) -> None:
    b = _tensor(doc, "w")["blocks"][0]
    doc["tensors"].append({"key": "sched/x", "path": ["sched", "x"], "rank": None, "dtype": "uint8",
                           "shape": [8], "blocks": [[[0], [8], 0, b[3] + 16, 8, 8, "raw", "0" * 16]]})


def _huge_without_blocks(doc: dict) -> None:
    doc["tensors"].append({"key": "sched/huge", "path": ["sched", "huge"], "rank": None, "dtype": "bfloat16",
                           "shape": [2**40, 2**12], "blocks": []})


def _half_covered(doc: dict) -> None:
    _tensor(doc, "w")["shape"] = [128, 64]


def _shape_with_overflowing_strides(doc: dict) -> None:
    # No elements, so no blocks and nothing to read; but torch cannot even create it.
    doc["tensors"].append({"key": "sched/e", "path": ["sched", "e"], "rank": None, "dtype": "float32",
                           "shape": [0, 2**48, 2**48], "blocks": []})


INDEX_BOUNDS: dict[str, tuple[Callable[[dict], None], type[CheckpointError], str]] = {
    "file-range-shared-by-two-tensors": (_alias_of_b, IndexFormatError, "'sched/alias'"),
    "file-range-inside-another-block": (_inside_other_block, IndexFormatError, "'sched/x'"),
    "huge-shape-without-blocks": (_huge_without_blocks, IncompleteCheckpointError, "'sched/huge'"),
    "shape-larger-than-its-blocks": (_half_covered, IncompleteCheckpointError, "'w'"),
    "shape-with-overflowing-strides": (_shape_with_overflowing_strides, IndexFormatError, "'sched/e'"),
}


@pytest.mark.parametrize("case", list(INDEX_BOUNDS))
def test_index_bounds(ckpt, case, capsys, tmp_path):
    mutate, kind, fragment = INDEX_BOUNDS[case]
    doc = _doc(ckpt)
    mutate(doc)
    _write(ckpt, doc)
    _expect_rejected(ckpt, kind, fragment, capsys, tmp_path)


def test_raw_length_beyond_what_the_codec_can_expand_to(ckpt, capsys, tmp_path):
    """16 stored zstd bytes decode to at most 16 * 32768 bytes: an index claiming more is refused
    when read, before any block is."""
    doc = _doc(ckpt)
    data = _data_file(ckpt, doc)
    offset = data.stat().st_size
    with data.open("ab") as f:
        f.write(b"\0" * 16)
    doc["files"][0]["size"] += 16
    n = 16 * ZSTD_MAX_RATIO + 1
    doc["tensors"].append({"key": "sched/bomb", "path": ["sched", "bomb"], "rank": None, "dtype": "uint8",
                           "shape": [n], "blocks": [[[0], [n], 0, offset, 16, n, "zstd", "0" * 16]]})
    _write(ckpt, doc)
    _expect_rejected(ckpt, IndexFormatError, "'sched/bomb'", capsys, tmp_path)


def test_accepted_indexes_are_bounded_by_their_files(pristine):
    """What validation accepts decodes to at most ZSTD_MAX_RATIO raw bytes per declared file byte."""
    index = shardckpt.read_index(pristine)
    assert index.bytes_raw() <= ZSTD_MAX_RATIO * sum(f.size for f in index.files)
    for t in index.tensors:
        assert sum(b.raw_length for b in t.blocks) == math.prod(t.shape) * t.torch_dtype.itemsize


# --- C and D: keys, ints and bytes ----------------------------------------------------------------


def _rekey_tensor(key: str, path: list[object]) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        _tensor(doc, "sched/m").update(key=key, path=path)

    return mutate


def _add_value(key: str, path: list[object], value: object) -> Callable[[dict], None]:
    return lambda doc: doc["values"].append({"key": key, "path": path, "rank": None, "value": value})


def _set_metadata(value: object) -> Callable[[dict], None]:
    return lambda doc: doc.update(metadata={"n": value})


KEYS_AND_INTS: dict[str, tuple[Callable[[dict], None], str]] = {
    # "\0" is how saves key per-rank items internally ("key\0rank"): a key holding it collides.
    "key-nul": (_rekey_tensor("sched/m\x000", ["sched", "m\x000"]), repr("sched/m\x000")),
    "key-newline": (_rekey_tensor("sched/m\n", ["sched", "m\n"]), repr("sched/m\n")),
    "key-lone-surrogate": (_rekey_tensor("sched/\ud800", ["sched", "\ud800"]), repr("sched/\ud800")),
    "value-key-lone-surrogate": (_add_value("sched/\udfff", ["sched", "\udfff"], 1), repr("sched/\udfff")),
    "path-int-2**64": (_add_value(f"sched/{2**64}", ["sched", 2**64], 1), f"'sched/{2**64}'"),
    "path-int-below-int64": (_add_value(f"sched/{-(2**63) - 1}", ["sched", -(2**63) - 1], 1), "'sched/-"),
    "value-int-2**64": (_add_value("sched/n", ["sched", "n"], 2**64), "'sched/n'"),
    "value-int-below-int64": (_add_value("sched/n", ["sched", "n"], -(2**63) - 1), "'sched/n'"),
    "value-int-1000-digits": (_add_value("sched/n", ["sched", "n"], 10**1000), "'sched/n'"),
    "value-dict-key-2**64": (_add_value("sched/n", ["sched", "n"], {"$dict": [[2**64, 1]]}), "'sched/n'"),
    "value-tuple-int-2**64": (_add_value("sched/n", ["sched", "n"], {"$tuple": [1, 2**64]}), "'sched/n'"),
    "metadata-int-2**70": (_set_metadata(2**70), "metadata"),
}


@pytest.mark.parametrize("case", list(KEYS_AND_INTS))
def test_keys_and_ints(ckpt, case, capsys, tmp_path):
    mutate, fragment = KEYS_AND_INTS[case]
    doc = _doc(ckpt)
    mutate(doc)
    _write(ckpt, doc)
    _expect_rejected(ckpt, IndexFormatError, fragment, capsys, tmp_path)


def test_ints_at_the_64_bit_bounds_are_accepted(ckpt):
    doc = _doc(ckpt)
    doc["metadata"] = {"lo": -(2**63), "hi": 2**64 - 1}
    doc["values"].append({"key": "sched/hi", "path": ["sched", "hi"], "rank": None, "value": 2**64 - 1})
    _write(ckpt, doc)
    assert shardckpt.read_index(ckpt).metadata == {"lo": -(2**63), "hi": 2**64 - 1}
    target = _target()
    shardckpt.load(target, ckpt)
    sched = target["sched"]
    assert isinstance(sched, Holder) and sched.state["hi"] == 2**64 - 1


def test_astral_characters_in_keys_are_accepted(ckpt):
    """A surrogate pair escape is one valid character, not a lone surrogate."""
    doc = _doc(ckpt)
    _tensor(doc, "sched/m").update(key="sched/m\U0001f600", path=["sched", "m\U0001f600"])
    _write(ckpt, doc)
    assert "\\ud83d\\ude00" in (ckpt / "index.json").read_text()
    target = _target()
    shardckpt.load(target, ckpt)
    sched = target["sched"]
    assert isinstance(sched, Holder) and torch.equal(sched.state["m\U0001f600"], M)


RAW: dict[str, Callable[[bytes], bytes]] = {
    # json.loads(bytes) would guess UTF-16 and decode UTF-8 with "surrogatepass"; the spec says UTF-8.
    "utf-16": lambda b: b.decode().encode("utf-16"),
    "utf-8-encoded-surrogate": lambda b: b.replace(
        b'"key":"sched/m","path":["sched","m"]', b'"key":"sched/m\xed\xa0\x80","path":["sched","m\xed\xa0\x80"]'
    ),
    "utf-8-bom": lambda b: b"\xef\xbb\xbf" + b,
}


@pytest.mark.parametrize("case", list(RAW))
def test_index_bytes_must_be_strict_utf8(ckpt, case, capsys, tmp_path):
    data = (ckpt / "index.json").read_bytes()
    hostile = RAW[case](data)
    assert hostile != data
    (ckpt / "index.json").write_bytes(hostile)
    _expect_rejected(ckpt, IndexFormatError, "index.json", capsys, tmp_path)


def _walk_memory(pristine: Path, entries: int, depth: int) -> int:
    """Peak bytes allocated to make a LoadWalk of ``pristine``'s index with ``entries`` more
    values at paths of ``depth`` parts."""
    import tracemalloc

    from shardckpt.format.index_json import decode_index
    from shardckpt.loading import LoadWalk

    doc = json.loads((pristine / "index.json").read_text())
    for i in range(entries):
        path = [f"v{i}"] + ["a"] * (depth - 1)
        doc["values"].append({"key": "/".join(path), "path": path, "rank": None, "value": 0})
    index = decode_index(json.dumps(doc).encode(), "x")
    tracemalloc.start()
    try:
        walk = LoadWalk(index, 0, "x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert walk.leads_to_entries(("v0", "a")) and not walk.leads_to_entries(tuple(["v0"] + ["a"] * (depth - 1)))
    assert not walk.leads_to_entries(("v0", "b")) and not walk.leads_to_entries(())
    return peak


def test_a_load_plans_in_memory_linear_in_the_paths_parts(pristine):
    # The same number of path parts, in long paths or in short ones: a set of every prefix of
    # every path cost about 4x more for the long ones (558 MiB for an audit's 3 MB index).
    long_paths, short_paths = _walk_memory(pristine, 100, 256), _walk_memory(pristine, 400, 64)
    assert long_paths < 1.5 * short_paths, (long_paths, short_paths)
