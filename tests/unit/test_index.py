"""The index: encode/decode round trips, typed JSON values, and hostile index files.

A hostile or damaged index.json must come out of ``read_index``, ``load`` and ``verify`` as a
``CheckpointError`` naming the checkpoint path, never as a KeyError, TypeError, IndexError,
RecursionError, MemoryError or a huge allocation.
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    IndexFormatError,
    StateMismatchError,
)
from shardckpt.format.index_json import decode_index, encode_index
from shardckpt.format.schema import BlockEntry, CheckpointIndex, FileEntry, TensorEntry, ValueEntry
from shardckpt.format.values import decode_value, encode_value
from tests.stateful import Holder

pytestmark = pytest.mark.timeout(120)




W = (torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 1000).to(torch.bfloat16)
B = torch.arange(10, dtype=torch.int64) * 7


def _state() -> dict[str, object]:
    return {
        "b": B.clone(),
        "w": W.clone(),
        "step": 3,
        "cfg": {"lr": 0.1, "betas": (0.9, 0.95), "ids": {0: "a"}, "eps": float("inf")},
        "sched": Holder({"last": 5, "groups": [{"lr": 0.1}]}),
    }


def _target() -> dict[str, object]:
    return {
        "b": torch.zeros(10, dtype=torch.int64),
        "w": torch.zeros(64, 64, dtype=torch.bfloat16),
        "step": 0,
        "cfg": None,
        "sched": Holder({"last": 0, "groups": [{"lr": 0.0}]}),
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "ckpt"
    # 4 KiB blocks: "w" (8 KiB of bf16) is stored as two blocks, so holes can be made.
    shardckpt.save(_state(), path, compression=shardckpt.CompressionOptions(block_bytes=4096),
                   metadata={"run": "unit", "epoch": 2})
    doc = json.loads((path / "index.json").read_bytes())
    assert [t["key"] for t in doc["tensors"]] == ["b", "w"]
    assert len(doc["tensors"][1]["blocks"]) == 2
    assert [v["key"] for v in doc["values"]] == ["cfg", "sched", "step"]
    return path


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(pristine, path)
    return path


def _doc(path: Path) -> dict:
    return json.loads((path / "index.json").read_bytes())


def _write(path: Path, doc_or_bytes: object) -> None:
    data = doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode()
    (path / "index.json").write_bytes(data)


# --- round trips --------------------------------------------------------------------------------


def test_real_index_round_trips(ckpt):
    data = (ckpt / "index.json").read_bytes()
    index = decode_index(data, "x")
    assert index == shardckpt.read_index(ckpt)
    assert encode_index(index) == data
    assert decode_index(encode_index(index), "x") == index
    assert index.metadata == {"run": "unit", "epoch": 2}
    assert index.bytes_raw() == 64 * 64 * 2 + 10 * 8


def test_synthetic_index_round_trips():
    files = (FileEntry("data/aa-r00000.bin", 0, 1000), FileEntry("data/aa-r00001.bin", 1, 2000))
    tensors = (
        TensorEntry("m/w", ("m", "w"), "float32", (4, 2), None,
                    (BlockEntry((0, 0), (2, 2), 0, 64, 10, 16, "zstd", "0" * 16),
                     BlockEntry((2, 0), (2, 2), 1, 64, 16, 16, "raw", "abcdef0123456789"))),
        TensorEntry("rng", ("rng",), "uint8", (5,), 1, (BlockEntry((0,), (5,), 1, 80, 5, 5, "raw", "f" * 16),)),
        TensorEntry("s", ("s",), "float64", (), None, (BlockEntry((), (), 0, 74, 8, 8, "raw", "1" * 16),)),
        TensorEntry("e", ("e",), "bool", (0, 3), None, ()),
    )
    values = (
        ValueEntry("opt/state/0/step", ("opt", "state", 0, "step"), 12, None),
        ValueEntry("pos", ("pos",), encode_value((1, {2: float("nan")}), "pos"), 0),
    )
    index = CheckpointIndex("0123abcd", 2, files, tensors, values, metadata={"note": "x", "n": [1, 2]})
    back = decode_index(encode_index(index), "x")
    assert back == index
    assert back.values[0].path == ("opt", "state", 0, "step")  # int path parts stay ints


# --- typed JSON values --------------------------------------------------------------------------


def same(a: object, b: object) -> bool:
    """Deep equality that also checks exact types and treats NaN as equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) and all(
            type(x) is type(y) for x, y in zip(a, b)
        )
    return a == b


def _json_round_trip(value: object) -> object:
    stored = json.loads(json.dumps(encode_value(value, "k"), allow_nan=False))
    return decode_value(stored, "here")


ints = st.integers(-(2**63), 2**64 - 1)  # what a checkpoint stores; larger ones are refused
scalars = (
    st.none() | st.booleans() | ints | st.sampled_from([-(2**63), 2**64 - 1]) | st.text(max_size=8)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["$float", "$tuple", "$dict", "$x", "nan"])
)
keys = (
    ints | st.text(max_size=6) | st.sampled_from(["$float", "$tuple", "$dict", "$", "inf"]) | st.booleans()
    | st.none() | st.floats(allow_nan=False) | st.tuples(ints, st.text(max_size=3))
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    | st.dictionaries(keys, inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_typed_values_round_trip(value):
    back = _json_round_trip(value)
    assert same(back, value), f"{value!r} came back as {back!r}"


@pytest.mark.parametrize(
    "value",
    [
        (1, 2),
        (),
        [(), [()], ((),)],
        {0: "a", 1: "b"},
        {1: {2: (3, 4)}},
        {"$float": "nan"},
        {"$tuple": [1]},
        {"a": 1, "$dict": 2},
        {(1, "x"): [float("-inf")]},
        {None: 1, True: 2, 2.5: 3},
        float("nan"),
        float("inf"),
        float("-inf"),
        -0.0,
        {"betas": (0.9, 0.999), "state": {0: {"step": 10, "eps": float("nan")}}},
        2**64 - 1,
        -(2**63),
    ],
    ids=repr,
)
def test_typed_values_examples(value):
    assert same(_json_round_trip(value), value)


@pytest.mark.parametrize(
    "bad",
    [{1, 2}, frozenset(), object(), b"bytes", bytearray(b"x"), 1j, torch.device("cpu"), [1, {"a": {3}}],
     {(1, b"x"): 1}, 10**30, -(2**63) - 1, {2**64: 1}],
    ids=lambda v: type(v).__name__,
)
def test_unsupported_values_raise_state_mismatch(bad):
    with pytest.raises(StateMismatchError, match="'opt/x'"):
        encode_value(bad, "opt/x")


def test_too_deep_value_raises_state_mismatch():
    deep: object = 1
    for _ in range(200):
        deep = [deep]
    with pytest.raises(StateMismatchError, match="'k'"):
        encode_value(deep, "k")


def test_save_refuses_unsupported_value_naming_key(tmp_path):
    path = tmp_path / "ckpt"
    # "cfg" holds no tensor, so it is one value: the error names it and the offending type.
    with pytest.raises(StateMismatchError, match=r"'cfg'.*type set"):
        shardckpt.save({"w": torch.ones(3), "cfg": {"tags": {"a", "b"}}}, path)
    assert not (path / "index.json").exists()


@pytest.mark.parametrize(
    "stored",
    [
        {"$float": "NaN"},
        {"$float": 1.0},
        {"$float": ["nan"]},
        {"$tuple": "ab"},
        {"$tuple": {"a": 1}},
        {"$dict": {"a": 1}},
        {"$dict": [[1]]},
        {"$dict": [[1, 2, 3]]},
        {"$dict": ["ab"]},
        {"$dict": [[[1], 2]]},
        {"$dict": [[{"a": 1}, 2]]},
        {"$dict": [[1, 2], [1, 3]]},
        {"$set": [1, 2]},
        {"a": 1, "$tuple": [1]},
        {"$dict": [[{"$tuple": [[1]]}, 1]]},
    ],
    ids=json.dumps,
)
def test_decode_value_rejects_what_encode_never_writes(stored):
    with pytest.raises(IndexFormatError, match="^ckpt/index.json: value 'x'"):
        decode_value(stored, "ckpt/index.json: value 'x'")


def test_decode_value_depth_limit():
    deep: object = 1
    for _ in range(500):
        deep = {"a": deep}
    with pytest.raises(IndexFormatError, match="nested deeper"):
        decode_value(deep, "here")


# --- hostile index files ------------------------------------------------------------------------


def _check_rejected(ckpt: Path, kind: type[CheckpointError] = IndexFormatError) -> None:
    """read_index, load and verify all raise ``kind`` with the checkpoint path in the message."""
    for name, call in (
        ("read_index", lambda: shardckpt.read_index(ckpt)),
        ("load", lambda: shardckpt.load(_target(), ckpt)),
        ("verify", lambda: shardckpt.verify(ckpt)),
    ):
        with pytest.raises(kind) as info:
            call()
        assert str(ckpt) in str(info.value), f"{name}: path missing from {info.value}"


def _set(path: tuple, value: object) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        node = doc
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return mutate


def _delete(path: tuple) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        node = doc
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return mutate


# Field path -> the JSON kinds it accepts. tensors[0] is "b" (int64 [10], one block), tensors[1] is
# "w" (bf16 [64, 64], two blocks), values[0] is "cfg".
FIELDS: dict[tuple, tuple[str, ...]] = {
    ("format",): ("str",),
    ("version",): ("int",),
    ("save_id",): ("str",),
    ("world_size",): ("int",),
    ("metadata",): ("dict",),
    ("files",): ("list",),
    ("files", 0): ("dict",),
    ("files", 0, "name"): ("str",),
    ("files", 0, "rank"): ("int",),
    ("files", 0, "size"): ("int",),
    ("tensors",): ("list",),
    ("tensors", 0): ("dict",),
    ("tensors", 0, "key"): ("str",),
    ("tensors", 0, "path"): ("list",),
    ("tensors", 0, "path", 0): ("str", "int"),
    ("tensors", 0, "dtype"): ("str",),
    ("tensors", 0, "shape"): ("list",),
    ("tensors", 0, "shape", 0): ("int",),
    ("tensors", 0, "rank"): ("int", "null"),
    ("tensors", 0, "blocks"): ("list",),
    ("tensors", 0, "blocks", 0): ("list",),
    ("tensors", 0, "blocks", 0, 0): ("list",),
    ("tensors", 0, "blocks", 0, 0, 0): ("int",),
    ("tensors", 0, "blocks", 0, 1): ("list",),
    ("tensors", 0, "blocks", 0, 1, 0): ("int",),
    ("tensors", 0, "blocks", 0, 2): ("int",),
    ("tensors", 0, "blocks", 0, 3): ("int",),
    ("tensors", 0, "blocks", 0, 4): ("int",),
    ("tensors", 0, "blocks", 0, 5): ("int",),
    ("tensors", 0, "blocks", 0, 6): ("str",),
    ("tensors", 0, "blocks", 0, 7): ("str",),
    ("values",): ("list",),
    ("values", 0): ("dict",),
    ("values", 0, "key"): ("str",),
    ("values", 0, "path"): ("list",),
    ("values", 0, "path", 0): ("str", "int"),
    ("values", 0, "rank"): ("int", "null"),
}
SAMPLES = {"null": None, "bool": True, "int": 1, "float": 1.5, "str": "x", "list": [], "dict": {}}
OPTIONAL = {("metadata",), ("tensors", 0, "rank"), ("values", 0, "rank")}

WRONG_TYPES = [
    pytest.param(_set(path, sample), id=f"{'.'.join(map(str, path))}={kind}")
    for path, accepted in FIELDS.items()
    for kind, sample in SAMPLES.items()
    if kind not in accepted
]
MISSING = [
    pytest.param(_delete(path), id=f"missing-{'.'.join(map(str, path))}")
    for path in FIELDS
    if isinstance(path[-1], str) and path not in OPTIONAL
] + [pytest.param(_delete(("values", 0, "value")), id="missing-values.0.value")]


@pytest.mark.parametrize("mutate", WRONG_TYPES + MISSING)
def test_wrong_types_and_missing_fields(ckpt, mutate):
    doc = _doc(ckpt)
    mutate(doc)
    _write(ckpt, doc)
    _check_rejected(ckpt)


def _w_block(j: int, field: int, value: object) -> Callable[[dict], None]:
    return _set(("tensors", 1, "blocks", j, field), value)


def _add_tensor(entry: dict) -> Callable[[dict], None]:
    return lambda doc: doc["tensors"].append(entry)


def _dup_file(doc: dict) -> None:
    doc["files"].append(dict(doc["files"][0]))


def _dup_tensor(doc: dict) -> None:
    doc["tensors"].append(copy.deepcopy(doc["tensors"][0]))


def _dup_value(doc: dict) -> None:
    doc["values"].append(copy.deepcopy(doc["values"][2]))


def _tensor_and_value_same_key(doc: dict) -> None:
    doc["values"].append({"key": "w", "path": ["w"], "rank": None, "value": 1})


def _per_rank_and_global_same_key(doc: dict) -> None:
    t = copy.deepcopy(doc["tensors"][0])
    t["rank"] = 0
    doc["tensors"].append(t)


def _blocks_past_file(doc: dict) -> None:
    size = doc["files"][0]["size"]
    doc["tensors"][0]["blocks"][0][3] = size - 1


def _raw_length_off_by_one(doc: dict) -> None:
    doc["tensors"][0]["blocks"][0][5] += 1


def _name(value: str) -> Callable[[dict], None]:
    return _set(("files", 0, "name"), value)


def _checksum(value: object) -> Callable[[dict], None]:
    return _set(("tensors", 0, "blocks", 0, 7), value)


HOSTILE = {
    # sizes and offsets
    "world_size=0": _set(("world_size",), 0),
    "world_size=-1": _set(("world_size",), -1),
    "world_size=2**40": _set(("world_size",), 2**40),
    "file.size=-1": _set(("files", 0, "size"), -1),
    "file.size=2**57": _set(("files", 0, "size"), 2**57),
    "file.size=2**200": _set(("files", 0, "size"), 2**200),
    "file.rank=-1": _set(("files", 0, "rank"), -1),
    "file.rank=world_size": _set(("files", 0, "rank"), 1),
    "tensor.rank=-1": _set(("tensors", 0, "rank"), -1),
    "tensor.rank=world_size": _set(("tensors", 0, "rank"), 1),
    "value.rank=world_size": _set(("values", 0, "rank"), 1),
    "shape=-1": _set(("tensors", 0, "shape"), [-1]),
    "shape=2**49": _set(("tensors", 0, "shape"), [2**49]),
    "shape=huge-product": _set(("tensors", 1, "shape"), [2**40, 2**40]),
    "ndim=65": _set(("tensors", 0, "shape"), [1] * 65),
    "ndim=1000": _set(("tensors", 0, "shape"), [1] * 1000),
    "offsets=-1": _w_block(0, 0, [-1, 0]),
    "offsets-too-few": _w_block(0, 0, [0]),
    "offsets-too-many": _w_block(0, 0, [0, 0, 0]),
    "sizes-past-shape": _w_block(1, 1, [33, 64]),
    "offsets-past-shape": _w_block(1, 0, [64, 0]),
    "sizes=-1": _w_block(0, 1, [-1, 64]),
    "block.file=1": _w_block(0, 2, 1),
    "block.file=-1": _w_block(0, 2, -1),
    "block.offset=-1": _w_block(0, 3, -1),
    "block.offset=2**60": _w_block(0, 3, 2**60),
    "block.length=-1": _w_block(0, 4, -1),
    "block.length=2**40": _w_block(0, 4, 2**40),
    "block-past-file-end": _blocks_past_file,
    "raw_length-mismatch": _raw_length_off_by_one,
    "raw_length=-1": _w_block(0, 5, -1),
    "raw_length=2**40": _w_block(0, 5, 2**40),
    "block-7-fields": lambda doc: doc["tensors"][1]["blocks"][0].pop(),
    "block-9-fields": lambda doc: doc["tensors"][1]["blocks"][0].append(0),
    "blocks-but-no-files": lambda doc: doc.update(files=[]),
    # file names
    "name-dotdot": _name("data/../index.json"),
    "name-dotdot-only": _name("data/.."),
    "name-parent": _name("../outside.bin"),
    "name-absolute": _name("/etc/passwd"),
    "name-absolute-data": _name("/data/x.bin"),
    "name-not-under-data": _name("index.json"),
    "name-nested": _name("data/sub/x.bin"),
    "name-empty": _name(""),
    "name-dir": _name("data/"),
    "name-backslash": _name("data\\..\\x.bin"),
    "name-nul": _name("data/x\0.bin"),
    "name-too-long": _name("data/" + "a" * 201),
    "name-unicode": _name("data/x\u2215y.bin"),
    "name-duplicate": _dup_file,
    # keys, dtypes, checksums, formats
    "dup-tensor-key": _dup_tensor,
    "dup-value-key": _dup_value,
    "tensor-and-value-same-key": _tensor_and_value_same_key,
    "per-rank-and-global-same-key": _per_rank_and_global_same_key,
    "dtype-unknown": _set(("tensors", 0, "dtype"), "float128"),
    "dtype-attribute": _set(("tensors", 0, "dtype"), "__class__"),
    "dtype-torch-name": _set(("tensors", 0, "dtype"), "torch.int64"),
    "key-not-path": _set(("tensors", 0, "key"), "not-b"),
    "value-key-not-path": _set(("values", 0, "key"), "other"),
    "codec-unknown": _w_block(0, 6, "lz4"),
    "codec-none": _w_block(0, 6, "none"),
    "block-inside-header": _set(("tensors", 0, "blocks", 0, 3), 0),
    "path-empty": _set(("tensors", 0, "path"), []),
    "path-bool": _set(("tensors", 0, "path"), [True]),
    "path-257-parts": _set(("tensors", 0, "path"), ["a"] * 257),
    "checksum-short": _checksum("0123"),
    "checksum-long": _checksum("0" * 17),
    "checksum-upper": _checksum("ABCDEF0123456789"),
    "checksum-non-hex": _checksum("g" * 16),
    "checksum-empty": _checksum(""),
    "format-other": _set(("format",), "safetensors"),
    "format-case": _set(("format",), "SHARDCKPT"),
    "version=2": _set(("version",), 2),
    "version=0": _set(("version",), 0),
    "version=2**80": _set(("version",), 2**80),
    "save_id-empty": _set(("save_id",), ""),
    "save_id-upper": _set(("save_id",), "ABCDEF01"),
    "save_id-slash": _set(("save_id",), "../../ab"),
    "save_id-long": _set(("save_id",), "a" * 65),
    # values
    "value-bad-tag": _set(("values", 2, "value"), {"$set": [1]}),
    "value-bad-float": _set(("values", 2, "value"), {"$float": "1e400"}),
    "value-too-deep": _set(("values", 2, "value"), json.loads("[" * 200 + "]" * 200)),
    "metadata-bad-tag": _set(("metadata",), {"$tuple": 1}),
    "metadata-tuple": _set(("metadata",), {"$tuple": [1]}),
    "metadata-float": _set(("metadata",), {"$float": "nan"}),
    "metadata-too-deep": _set(("metadata",), json.loads('{"a":' * 200 + "1" + "}" * 200)),
}

# Fixed bugs, kept as regression cases.
BUGS = {
    # Names made only of dots pass the name check: "data/." is the data directory itself.
    "name-dot": (_name("data/."), "BUG: _FILE_NAME accepts 'data/.' (the data directory itself)"),
    # "$" also matches before a trailing newline: re.match(r"...$") accepts "x\n".
    "name-newline": (_name("data/x.bin\n"), "BUG: _FILE_NAME uses '$', which matches before a trailing newline"),
    "checksum-newline": (_checksum("0123456789abcdef\n"), "BUG: _CHECKSUM uses '$' (trailing newline accepted)"),
    "save_id-newline": (_set(("save_id",), "0123abcd\n"), "BUG: _SAVE_ID uses '$' (trailing newline accepted)"),
}


@pytest.mark.parametrize(
    "mutate",
    [pytest.param(fn, id=name) for name, fn in HOSTILE.items()]
    + [pytest.param(fn, id=name) for name, (fn, _why) in BUGS.items()],
)
def test_hostile_field_values(ckpt, mutate):
    doc = _doc(ckpt)
    mutate(doc)
    _write(ckpt, doc)
    _check_rejected(ckpt)


def _dup_json_key(text: str, once: str) -> str:
    assert text.count(once) >= 1
    return text.replace(once, f"{once},{once}", 1)


RAW_HOSTILE: dict[str, Callable[[bytes], bytes]] = {
    "dup-json-key-top": lambda b: _dup_json_key(b.decode(), '"version":1').encode(),
    "dup-json-key-tensor": lambda b: _dup_json_key(b.decode(), '"key":"w"').encode(),
    "dup-json-key-metadata": lambda b: _dup_json_key(b.decode(), '"run":"unit"').encode(),
    "nested-lists-100000": lambda b: b"[" * 100_000 + b"]" * 100_000,
    "nested-dicts-100000": lambda b: b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "nested-in-metadata": lambda b: b.replace(
        b'"metadata":{', b'"metadata":{"deep":' + b"[" * 100_000 + b"]" * 100_000 + b",", 1
    ),
    "not-json": lambda b: b"this is not an index",
    "binary": lambda b: bytes(range(256)),
    "bad-utf8": lambda b: b'{"format":"\xff\xfe"}',
    "truncated": lambda b: b[: len(b) // 2],
    "trailing-garbage": lambda b: b + b"}",
    "two-documents": lambda b: b + b,
    "nan-literal": lambda b: b.replace(b'"version":1', b'"version":NaN'),
    "infinity-literal": lambda b: b.replace(b'"world_size":1', b'"world_size":Infinity'),
    "huge-int": lambda b: b.replace(b'"world_size":1', b'"world_size":' + b"9" * 5000),
    "top-level-list": lambda b: b"[" + b + b"]",
    "top-level-string": lambda b: b'"shardckpt"',
    "top-level-null": lambda b: b"null",
    "nul-bytes": lambda b: b"\0" * 100,
    "whitespace": lambda b: b"   \n",
}


@pytest.mark.parametrize("mutate", [pytest.param(fn, id=name) for name, fn in RAW_HOSTILE.items()])
def test_hostile_index_bytes(ckpt, mutate):
    _write(ckpt, mutate((ckpt / "index.json").read_bytes()))
    _check_rejected(ckpt)


def test_empty_index_file(ckpt):
    _write(ckpt, b"")
    _check_rejected(ckpt, CorruptCheckpointError)


def test_index_is_a_directory(ckpt):
    (ckpt / "index.json").unlink()
    (ckpt / "index.json").mkdir()
    _check_rejected(ckpt, CorruptCheckpointError)  # "not a regular file (a directory)"


# Indexes that parse but point at the wrong data: read_index may accept them, but load and verify
# must refuse them, naming the path (and the tensor where one is to blame).
def _swap_codec(doc: dict) -> None:
    doc["tensors"][1]["blocks"][0][6] = "raw" if doc["tensors"][1]["blocks"][0][6] != "raw" else "zstd"


def _shift_block(doc: dict) -> None:
    doc["tensors"][0]["blocks"][0][3] -= 1


def _other_checksum(doc: dict) -> None:
    c = doc["tensors"][1]["blocks"][1][7]
    doc["tensors"][1]["blocks"][1][7] = ("0" if c[0] != "0" else "1") + c[1:]


def _hole(doc: dict) -> None:
    doc["tensors"][1]["blocks"].pop()


def _overlap(doc: dict) -> None:
    blocks = doc["tensors"][1]["blocks"]
    blocks.append(copy.deepcopy(blocks[0]))


def _inflate_file(doc: dict) -> None:
    doc["files"][0]["size"] += 10


def _other_save_id(doc: dict) -> None:
    doc["save_id"] = "ffffffffffffffff" if doc["save_id"] != "ffffffffffffffff" else "eeeeeeeeeeeeeeee"


def _other_rank(doc: dict) -> None:
    doc["world_size"] = 2
    doc["files"][0]["rank"] = 1


def _missing_file(doc: dict) -> None:
    doc["files"][0]["name"] = "data/nothing-here.bin"


def _block_in_header(doc: dict) -> None:
    doc["tensors"][0]["blocks"][0][3] = 0


DATA_LEVEL: dict[str, tuple[Callable[[dict], None], type[CheckpointError], str | None]] = {
    "unknown-codec": (_w_block(0, 6, "lz4"), CorruptCheckpointError, "w"),
    "swapped-codec": (_swap_codec, CorruptCheckpointError, "w"),
    "shifted-block": (_shift_block, CorruptCheckpointError, "b"),
    "block-in-header": (_block_in_header, CorruptCheckpointError, "b"),
    "other-checksum": (_other_checksum, CorruptCheckpointError, "w"),
    "hole": (_hole, IncompleteCheckpointError, "w"),
    "overlapping-blocks": (_overlap, IndexFormatError, "w"),
    "inflated-file-size": (_inflate_file, CorruptCheckpointError, None),
    "other-save-id": (_other_save_id, CorruptCheckpointError, None),
    "other-rank": (_other_rank, CorruptCheckpointError, None),
    "missing-file": (_missing_file, IncompleteCheckpointError, None),
}


@pytest.mark.parametrize("case", list(DATA_LEVEL), ids=list(DATA_LEVEL))
def test_index_pointing_at_wrong_data(ckpt, case):
    mutate, kind, key = DATA_LEVEL[case]
    doc = _doc(ckpt)
    mutate(doc)
    _write(ckpt, doc)
    for call in (lambda: shardckpt.load(_target(), ckpt), lambda: shardckpt.verify(ckpt)):
        with pytest.raises(kind) as info:
            call()
        assert str(ckpt) in str(info.value)
        if key is not None:
            assert repr(key) in str(info.value)


def test_huge_tensor_under_a_stateful_object_is_not_allocated(ckpt):
    # 2**53 bytes declared, no blocks: load must report the missing data, not try to allocate it.
    doc = _doc(ckpt)
    doc["tensors"].append(
        {"key": "sched/huge", "path": ["sched", "huge"], "rank": None, "dtype": "bfloat16",
         "shape": [2**40, 2**12], "blocks": []}
    )
    _write(ckpt, doc)
    with pytest.raises(IncompleteCheckpointError) as info:
        shardckpt.load(_target(), ckpt)
    assert str(ckpt) in str(info.value) and "'sched/huge'" in str(info.value)


def test_huge_tensor_is_reported_by_verify(ckpt):
    doc = _doc(ckpt)
    doc["tensors"].append(
        {"key": "sched/huge", "path": ["sched", "huge"], "rank": None, "dtype": "bfloat16",
         "shape": [2**40, 2**12], "blocks": []}
    )
    _write(ckpt, doc)
    with pytest.raises(IncompleteCheckpointError, match="'sched/huge'") as info:
        shardckpt.verify(ckpt)
    assert str(ckpt) in str(info.value)


def test_negative_list_index_in_a_path(ckpt):
    # "sched" holds a list "groups"; an extra entry claims to live at groups[-3].
    doc = _doc(ckpt)
    doc["values"].append({"key": "sched/groups/-3", "path": ["sched", "groups", -3], "rank": None, "value": 1})
    _write(ckpt, doc)
    with pytest.raises(CheckpointError) as info:
        shardckpt.load(_target(), ckpt)
    assert str(ckpt) in str(info.value)


def test_entry_past_the_end_of_a_list_in_a_path(ckpt):
    doc = _doc(ckpt)
    doc["values"].append({"key": "sched/groups/7/x", "path": ["sched", "groups", 7, "x"], "rank": None, "value": 1})
    _write(ckpt, doc)
    with pytest.raises(StateMismatchError, match="'sched/groups/7/x'"):
        shardckpt.load(_target(), ckpt)


def test_pristine_copy_is_valid(ckpt):
    """The fixtures above start from a checkpoint that loads and verifies."""
    shardckpt.verify(ckpt)
    target = _target()
    shardckpt.load(target, ckpt)
    assert torch.equal(target["w"], W) and torch.equal(target["b"], B)
    assert target["step"] == 3 and target["cfg"]["betas"] == (0.9, 0.95) and target["cfg"]["ids"] == {0: "a"}
    assert target["sched"].state == {"last": 5, "groups": [{"lr": 0.1}]}


# --- fuzzing ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64])
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
    | st.sampled_from(["data/..", "../x", "/etc/passwd", "$tuple", "float128", "bfloat16", "raw", "zstd", "planes"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def _pick_node(data, doc: object) -> tuple[object, object]:
    """Walk from the root to a random container and key inside ``doc``."""
    node, key = doc, None
    while True:
        children = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        if not children:
            return node, None
        key = data.draw(st.sampled_from(children))
        child = node[key]
        if not isinstance(child, dict | list) or not data.draw(st.booleans()):
            return node, key
        node = child


def _run_all(path: Path) -> None:
    """read_index, then verify and load: each may succeed; any failure must be a CheckpointError."""
    for call in (lambda: shardckpt.read_index(path), lambda: shardckpt.verify(path),
                 lambda: shardckpt.load(_target(), path, strict=False)):
        try:
            call()
        except CheckpointError as e:
            assert str(path) in str(e), f"path missing from {type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def fuzz_dir(pristine, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(pristine, path)
    return path


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_fuzz_index_fields(fuzz_dir, pristine, data):
    doc = _doc(pristine)
    for _ in range(data.draw(st.integers(1, 3))):
        node, key = _pick_node(data, doc)
        if key is None:
            continue
        action = data.draw(st.sampled_from(["replace", "delete", "tweak"]))
        if action == "delete":
            if isinstance(node, dict):
                del node[key]
            else:
                node.pop(key)
        elif action == "tweak" and isinstance(node[key], int) and not isinstance(node[key], bool):
            node[key] += data.draw(st.sampled_from([-1, 1, -(2**40), 2**40, 64]))
        else:
            node[key] = data.draw(json_values)
    _write(fuzz_dir, doc)
    _run_all(fuzz_dir)


@FUZZ
@given(data=st.data())
def test_fuzz_index_bytes(fuzz_dir, pristine, data):
    raw = bytearray((pristine / "index.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "delete", "insert"]))
        if action == "flip":
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            raw[pos] = data.draw(st.sampled_from(b'0123456789-.,:[]{}"\\etnfa\x00\xff'))
        elif action == "delete" and len(raw) > 1:
            del raw[pos]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    _write(fuzz_dir, bytes(raw))
    _run_all(fuzz_dir)
