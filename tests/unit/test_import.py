"""Import from Hugging Face safetensors: load_safetensors (into a model or state, in place) and
read_safetensors (plain tensors). Bit-exact round trips with our export and with the safetensors
package's writer, transformers models from save_pretrained with equal logits, names, strictness,
dtype casts, ranged reads (byte runs checked against numpy), hostile headers and weight maps,
S3, and convert --from safetensors."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import shardckpt
from shardckpt.cli import main
from shardckpt.interop import safetensors_format, safetensors_import
from shardckpt.interop.safetensors_import import box_runs
from shardckpt.planning.boxes import Box
from tests.backends import moto_s3, s3_env  # noqa: F401 - fixtures (a real S3 server)
from tests.unit.test_export import _tiny_gpt2, _tiny_llama

safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.timeout(180)


def _dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 11, generator=g)
    return {
        "f32": base, "bf16": base.bfloat16(), "f16": base.half(), "i64": torch.randint(-(2**40), 2**40, (5, 3), generator=g),
        "bool": torch.tensor([[True, False, True], [False, False, True]]), "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4), "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
        "nan_payload": torch.tensor([0x7FC00001, -1], dtype=torch.int32).view(torch.float32),
    }


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def _write(path, header: object, data: bytes = b"", *, raw: bytes | None = None) -> None:
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# --- round trips -------------------------------------------------------------------------------

def test_export_then_import_is_bit_exact_for_every_dtype(tmp_path):
    tensors = _dtypes()
    shardckpt.save({"model": tensors}, tmp_path / "c")
    shardckpt.export_safetensors(tmp_path / "c", tmp_path / "hf", key="model", max_shard_size="600B")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded
    target = {k: torch.zeros_like(v) for k, v in tensors.items()}
    r = shardckpt.load_safetensors(target, tmp_path / "hf")
    assert all(_same_bits(target[k], v) for k, v in tensors.items())
    assert r.tensors == len(tensors) and r.bytes_read == sum(v.numel() * v.itemsize for v in tensors.values())
    got = shardckpt.read_safetensors(tmp_path / "hf")
    assert set(got) == set(tensors) and all(_same_bits(got[k], v) for k, v in tensors.items())
    # A dict target nested by module-like names ("a.b" from {"a": {"b": ...}}).
    nested = {"x": {"f32": torch.zeros(37, 11)}}
    shardckpt.load_safetensors(nested, tmp_path / "hf", prefix="", strict=False)
    assert torch.equal(nested["x"]["f32"], torch.zeros(37, 11))  # "x.f32" is not in the file: reported, untouched


def test_files_written_by_the_safetensors_package_import_bit_exactly(tmp_path):
    tensors = {k: v for k, v in _dtypes().items()}
    safetensors_torch.save_file(tensors, tmp_path / "weights.safetensors", metadata={"format": "pt"})
    got = shardckpt.read_safetensors(tmp_path / "weights.safetensors", ["bf16", "nan_payload"])
    assert list(got) == ["bf16", "nan_payload"] and _same_bits(got["nan_payload"], tensors["nan_payload"])
    target = {k: torch.ones_like(v) for k, v in tensors.items()}
    shardckpt.load_safetensors(target, tmp_path / "weights.safetensors")
    assert all(_same_bits(target[k], v) for k, v in tensors.items())
    with pytest.raises(shardckpt.MissingKeysError, match="'nope'"):
        shardckpt.read_safetensors(tmp_path / "weights.safetensors", ["nope"])


def test_column_and_row_boxes_read_only_their_runs(tmp_path, monkeypatch):
    """A non-contiguous target (a column slice) and a strided staging path give the same bytes."""
    w = torch.randn(9, 10)
    safetensors_torch.save_file({"w": w}, tmp_path / "model.safetensors")
    big = torch.zeros(9, 20)
    shardckpt.load_safetensors({"w": big[:, 5:15]}, tmp_path)  # not contiguous: through a staging buffer
    assert torch.equal(big[:, 5:15], w) and not big[:, :5].any() and not big[:, 15:].any()
    big = torch.zeros(9, 20)
    monkeypatch.setattr(safetensors_import, "PIECE_BYTES", 64)  # one row per piece: each straight into its row
    shardckpt.load_safetensors({"w": big[:, 5:15]}, tmp_path)
    assert torch.equal(big[:, 5:15], w) and not big[:, :5].any() and not big[:, 15:].any()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=0, max_size=4).flatmap(
    lambda shape: st.tuples(st.just(tuple(shape)),
                            st.tuples(*[st.integers(0, n - 1) for n in shape]),
                            st.tuples(*[st.integers(1, n) for n in shape]))))
def test_box_runs_are_the_boxs_bytes_in_order_and_maximal(case):
    shape, lo, want = case
    sizes = tuple(min(s, n - o) for s, n, o in zip(want, shape, lo))
    box = Box(tuple(lo), sizes)
    itemsize, start = 2, 40
    elements = np.arange(int(np.prod(shape))).reshape(shape)[tuple(slice(o, o + s) for o, s in zip(lo, sizes))]
    expected = [start + int(e) * itemsize + b for e in elements.reshape(-1) for b in range(itemsize)]
    runs = box_runs(shape, box, itemsize, start)
    assert [off + i for off, n in runs for i in range(n)] == expected
    assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:]))  # no two runs touch: one read each


# --- transformers -------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [lambda: _tiny_llama(False), lambda: _tiny_llama(True), _tiny_gpt2],
                         ids=["llama", "llama-tied", "gpt2"])
def test_save_pretrained_imports_into_a_fresh_model_with_equal_logits(tmp_path, build):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    torch.manual_seed(1)
    fresh = build().eval()
    r = shardckpt.load_safetensors(fresh, tmp_path / "hf")
    assert r.missing == r.unexpected == ()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    for name, p in model.state_dict().items():
        assert _same_bits(fresh.state_dict()[name], p), name
    if getattr(model.config, "tie_word_embeddings", False):
        assert "lm_head.weight" not in weight_map  # written once: filled through the embedding
        assert fresh.lm_head.weight.data_ptr() == fresh.get_input_embeddings().weight.data_ptr()


def test_tied_plain_state_dict_and_prefix_for_the_base_model(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _tiny_llama(True).eval()
    model.save_pretrained(tmp_path / "hf")
    torch.manual_seed(1)
    fresh = _tiny_llama(True)
    # A state dict of a tied model: the two names share memory, filled through the one in the file.
    sd = fresh.state_dict()
    shardckpt.load_safetensors(sd, tmp_path / "hf")
    assert torch.equal(fresh.lm_head.weight, model.model.embed_tokens.weight)
    # The base model alone, from the ...ForCausalLM file: names under "model." only.
    base = _tiny_llama(True).model
    r = shardckpt.load_safetensors(base, tmp_path / "hf", prefix="model.")
    assert r.unexpected == () and torch.equal(base.norm.weight, model.model.norm.weight)
    assert torch.equal(base.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


# --- names, strictness, dtypes ------------------------------------------------------------------

def _small_file(tmp_path) -> dict[str, torch.Tensor]:
    tensors = {"a.w": torch.randn(4, 3), "a.b": torch.randn(4), "c": torch.arange(6)}
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    return tensors


def test_missing_and_unexpected_names_strict_and_not(tmp_path):
    tensors = _small_file(tmp_path)
    with pytest.raises(shardckpt.MissingKeysError, match="'a.extra'"):
        shardckpt.load_safetensors({"a": {"w": torch.zeros(4, 3), "extra": torch.zeros(1)}, "a.b": torch.zeros(4),
                                    "c": torch.zeros(6, dtype=torch.int64)}, tmp_path)
    target = {"a": {"w": torch.zeros(4, 3)}}
    with pytest.raises(shardckpt.StateMismatchError, match="not in the state: 'a.b', 'c'"):
        shardckpt.load_safetensors(target, tmp_path)
    assert not target["a"]["w"].any()  # strictness is decided before anything is read
    target = {"a": {"w": torch.zeros(4, 3), "extra": torch.zeros(1)}, "step": 3}
    r = shardckpt.load_safetensors(target, tmp_path, strict=False)
    assert r.missing == ("a.extra", "step") and r.unexpected == ("a.b", "c")
    assert torch.equal(target["a"]["w"], tensors["a.w"])
    # prefix: the names below "a."; "c" is outside it, so not unexpected.
    target = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}
    assert shardckpt.load_safetensors(target, tmp_path, prefix="a.").unexpected == ()
    assert torch.equal(target["b"], tensors["a.b"])
    with pytest.raises(shardckpt.StateMismatchError, match="Adam.*pass the model"):
        shardckpt.load_safetensors({"o": torch.optim.Adam([nn.Parameter(torch.ones(1))])}, tmp_path)


def test_dtype_mismatch_is_refused_unless_cast_and_shape_mismatch_always(tmp_path):
    tensors = _small_file(tmp_path)
    target = {"a.w": torch.zeros(4, 3, dtype=torch.bfloat16), "a.b": torch.zeros(4), "c": torch.zeros(6, dtype=torch.int64)}
    with pytest.raises(shardckpt.StateMismatchError, match="'a.w'.*torch.float32.*torch.bfloat16.*dtype_cast=True"):
        shardckpt.load_safetensors(target, tmp_path)
    r = shardckpt.load_safetensors(target, tmp_path, dtype_cast=True)
    assert r.cast == ("a.w",) and _same_bits(target["a.w"], tensors["a.w"].bfloat16())
    with pytest.raises(shardckpt.StateMismatchError, match="'c'.*int64.*int32; only floating-point tensors are cast"):
        shardckpt.load_safetensors({**target, "c": torch.zeros(6, dtype=torch.int32)}, tmp_path, dtype_cast=True)
    with pytest.raises(shardckpt.StateMismatchError, match=r"'a.b'.*\[4\].*\[5\]"):
        shardckpt.load_safetensors({"a.w": torch.zeros(4, 3), "a.b": torch.zeros(5), "c": torch.zeros(6)}, tmp_path,
                                   dtype_cast=True)
    with pytest.raises(shardckpt.StateMismatchError, match="meta tensor"):
        shardckpt.load_safetensors({"c": torch.empty(6, dtype=torch.int64, device="meta")}, tmp_path, strict=False)


def test_locations_links_and_not_found(tmp_path):
    tensors = _small_file(tmp_path)
    # The Hugging Face cache: snapshot files are links to blobs elsewhere.
    (tmp_path / "blobs").mkdir()
    os.replace(tmp_path / "model.safetensors", tmp_path / "blobs" / "abc123")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "model.safetensors").symlink_to("../blobs/abc123")
    assert torch.equal(shardckpt.read_safetensors(tmp_path / "snap")["c"], tensors["c"])
    with pytest.raises(shardckpt.CheckpointNotFoundError, match="neither model.safetensors.index.json nor"):
        shardckpt.read_safetensors(tmp_path / "blobs")
    shardckpt.save({"x": torch.ones(2)}, tmp_path / "ours")
    with pytest.raises(shardckpt.CheckpointNotFoundError, match="shardckpt checkpoint.*shardckpt.load"):
        shardckpt.read_safetensors(tmp_path / "ours")
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.read_safetensors(tmp_path / "nothing.safetensors")


def test_import_from_s3_by_ranged_reads(tmp_path, s3_env):  # noqa: F811 - the fixture imported above
    tensors = _dtypes()
    shardckpt.save({"model": tensors}, tmp_path / "c")
    shardckpt.export_safetensors(tmp_path / "c", tmp_path / "hf", key="model", max_shard_size="600B")
    client = s3_env.client()
    for f in os.listdir(tmp_path / "hf"):
        client.upload_file(str(tmp_path / "hf" / f), s3_env.bucket, f"hf/{f}")
    target = {k: torch.zeros_like(v) for k, v in tensors.items()}
    shardckpt.load_safetensors(target, s3_env.url("hf"))
    assert all(_same_bits(target[k], v) for k, v in tensors.items())
    one = sorted(f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors"))[0]
    got = shardckpt.read_safetensors(s3_env.url("hf", one))
    assert got and all(_same_bits(v, tensors[k]) for k, v in got.items())


# --- hostile input ------------------------------------------------------------------------------

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE_HEADERS = {
    "not json": (b"{\"a\": ", "not valid JSON"),
    "not utf-8": (b"{\"\xff\": 1}", "not valid JSON"),
    "an array": (b"[1, 2]", "JSON list, not an object"),
    "duplicate names": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', "duplicate JSON key"),
    "NaN": (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "NaN is not JSON"),
    "deep nesting": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON"),
    "unknown dtype": ({"a": {**F32, "dtype": "F128"}}, "'a': unknown dtype 'F128'"),
    "negative dim": ({"a": {**F32, "shape": [-2]}}, "'a': shape"),
    "float dim": ({"a": {**F32, "shape": [2.0]}}, "'a': shape"),
    "bool dim": ({"a": {**F32, "shape": [True, 2]}}, "'a': shape"),
    "huge shape": ({"a": {**F32, "shape": [2**40, 2**40, 0]}}, "'a': shape .* too large"),
    "size mismatch": ({"a": {**F32, "shape": [3]}}, "'a' is F32\\[3\\], 12 bytes, but its data_offsets \\[0, 8\\] hold 8"),
    "offsets reversed": ({"a": {**F32, "data_offsets": [8, 0]}}, "'a': data_offsets"),
    "offsets not a pair": ({"a": {**F32, "data_offsets": [0]}}, "'a': data_offsets"),
    "past the end": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "'a' ends at data byte 16, past"),
    "overlap": ({"a": F32, "b": {**F32, "data_offsets": [4, 12], "shape": [2]}}, "'a' and 'b' overlap"),
    "entry not an object": ({"a": [1]}, "'a': its header entry is not an object"),
    "metadata not str": ({"__metadata__": {"x": 1}, "a": F32}, "__metadata__ must map strings to strings"),
    "empty name": ({"": F32}, "empty name"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_headers_raise_corrupt_checkpoint_error_naming_file_and_tensor(tmp_path, case):
    header, match = HOSTILE_HEADERS[case]
    _write(tmp_path / "model.safetensors", header if not isinstance(header, bytes) else None, bytes(12),
           raw=header if isinstance(header, bytes) else None)
    for call in (lambda: shardckpt.read_safetensors(tmp_path),
                 lambda: shardckpt.load_safetensors({"a": torch.zeros(2)}, tmp_path)):
        with pytest.raises(shardckpt.CorruptCheckpointError, match=match) as e:
            call()
        assert "model.safetensors" in str(e.value)


def test_hostile_header_lengths(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(shardckpt.CorruptCheckpointError, match="100000001 is over the 100000000-byte limit"):
        shardckpt.read_safetensors(p)
    p.write_bytes(struct.pack("<Q", 64) + b"{}")  # longer than the file
    with pytest.raises(shardckpt.CorruptCheckpointError, match="header length 64 does not fit the file"):
        shardckpt.read_safetensors(p)
    p.write_bytes(b"\x02\x00")
    with pytest.raises(shardckpt.CorruptCheckpointError, match="too short"):
        shardckpt.read_safetensors(p)


def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path):
    _write(tmp_path / "model.safetensors", {"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}, b"\x01\x00\x07")
    with pytest.raises(shardckpt.CorruptCheckpointError, match="'m' \\(BOOL\\) holds bytes other than 0 and 1"):
        shardckpt.read_safetensors(tmp_path)


def test_truncated_data_is_an_error_before_any_allocation(tmp_path, monkeypatch):
    """A header that claims a huge tensor in a small file is refused before torch.empty is called."""
    _write(tmp_path / "model.safetensors", {"big": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 1 << 32]}})
    allocations = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k))
    with pytest.raises(shardckpt.CorruptCheckpointError, match="'big' ends at data byte 4294967296, past the end"):
        shardckpt.read_safetensors(tmp_path)
    assert allocations == []


@pytest.mark.parametrize("file, match", [
    ("../outside.safetensors", "not a plain file name"), ("/etc/passwd", "not a plain file name"),
    ("a\\..\\b.safetensors", "not a plain file name"), ("s3://x/y.safetensors", "not a plain file name"),
    ("./model-1.safetensors", "not a plain file name"), (7, "is not a tensor name and a file name"),
])
def test_hostile_weight_maps_raise_index_format_error(tmp_path, file, match):
    safetensors_torch.save_file({"w": torch.ones(2)}, tmp_path / "model-1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": file}}))
    with pytest.raises(shardckpt.IndexFormatError, match=match):
        shardckpt.read_safetensors(tmp_path)


def test_weight_map_shapes_and_lies(tmp_path, monkeypatch):
    index = tmp_path / "model.safetensors.index.json"
    safetensors_torch.save_file({"w": torch.ones(2)}, tmp_path / "model-1.safetensors")
    for doc, match in [("[]", "no \"weight_map\""), ('{"weight_map": []}', "no \"weight_map\""),
                       ('{"weight_map": {"w": "a", "w": "b"}}', "duplicate JSON key"), ("{", "not valid JSON")]:
        index.write_text(doc)
        with pytest.raises(shardckpt.IndexFormatError, match=match):
            shardckpt.read_safetensors(tmp_path)
    index.write_text(json.dumps({"weight_map": {"v": "model-1.safetensors"}}))  # the file does not hold "v"
    with pytest.raises(shardckpt.IndexFormatError, match="maps tensor 'v' to model-1.safetensors, whose header"):
        shardckpt.read_safetensors(tmp_path)
    index.write_text(json.dumps({"weight_map": {"w": "model-2.safetensors"}}))
    with pytest.raises(shardckpt.IncompleteCheckpointError, match="model-2.safetensors"):
        shardckpt.read_safetensors(tmp_path)
    monkeypatch.setattr(safetensors_format, "MAX_INDEX_BYTES", 10)
    with pytest.raises(shardckpt.IndexFormatError, match="over the 10-byte limit"):
        safetensors_format.parse_weight_map(index.read_bytes(), str(index))


# --- convert --from safetensors -----------------------------------------------------------------

def test_convert_from_safetensors_then_load_is_bit_exact(tmp_path, capsys):
    tensors = {f"layers.{i}.{k}": v for i in range(2) for k, v in _dtypes().items()}
    shardckpt.save({"model": tensors}, tmp_path / "c")
    shardckpt.export_safetensors(tmp_path / "c", tmp_path / "hf", key="model", max_shard_size="2KB")
    assert main(["convert", "--from", "safetensors", str(tmp_path / "hf"), str(tmp_path / "out"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["from"] == "safetensors" and doc["tensors"] == len(tensors)
    got = shardckpt.load_all(tmp_path / "out")
    assert set(got) == set(tensors) and all(_same_bits(got[k], v) for k, v in tensors.items())
    target = {k: torch.zeros_like(v) for k, v in tensors.items()}
    shardckpt.load(target, tmp_path / "out")
    assert all(_same_bits(target[k], v) for k, v in tensors.items())
    # A hostile source: one line on stderr, exit 2, nothing written.
    _write(tmp_path / "bad.safetensors", {"a": {**F32, "dtype": "F128"}}, bytes(8))
    assert main(["convert", "--from", "safetensors", str(tmp_path / "bad.safetensors"), str(tmp_path / "out2")]) == 2
    assert "CorruptCheckpointError" in capsys.readouterr().err and not (tmp_path / "out2").exists()
