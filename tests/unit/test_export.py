"""Template-free load (load_all, CheckpointReader) and the Hugging Face safetensors export: bit-exact
round trips through the safetensors package's own loader, sharding, casts, names, ties, streaming,
and (when transformers is installed) from_pretrained on a tiny Llama and GPT-2 with equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import shardckpt
import shardckpt.interop.safetensors as st_export
from shardckpt.cli import main

safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.timeout(180)


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 11, generator=g)
    return {
        "f64": base.double(), "f32": base, "f16": base.half(), "bf16": base.bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (5, 3), generator=g), "i32": torch.arange(-6, 6, dtype=torch.int32),
        "i16": torch.arange(9, dtype=torch.int16), "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "f8": base[:3].to(torch.float8_e4m3fn), "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
    }


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


# --- load_all -----------------------------------------------------------------------------------

def test_load_all_returns_the_nested_state_without_a_template(tmp_path):
    state = {"model": {"w": torch.randn(40, 7), "enc": {"b": torch.arange(5)}}, "step": 12,
             "opt": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}, "rng": shardckpt.PerRank(torch.arange(3))}
    shardckpt.save(state, tmp_path / "c")
    got = shardckpt.load_all(tmp_path / "c")
    assert _bitwise_equal(got["model"]["w"], state["model"]["w"])
    assert torch.equal(got["model"]["enc"]["b"], state["model"]["enc"]["b"])
    assert got["step"] == 12 and got["opt"] == {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}
    # Per-rank entries come back as ByRank: saving rank -> value.
    assert isinstance(got["rng"], shardckpt.ByRank) and list(got["rng"]) == [0]
    assert torch.equal(got["rng"][0], torch.arange(3))
    assert "rng" not in shardckpt.load_all(tmp_path / "c", per_rank="skip")


def test_load_all_selects_keys_and_prefixes(tmp_path):
    shardckpt.save({"model": {"a": torch.ones(3), "b": torch.zeros(2)}, "optim": {"x": torch.ones(4)}, "step": 1},
                   tmp_path / "c")
    got = shardckpt.load_all(tmp_path / "c", ["model/a", "step"])
    assert set(got) == {"model", "step"} and set(got["model"]) == {"a"}
    assert set(shardckpt.load_all(tmp_path / "c", "optim")) == {"optim"}  # one str is one key, not its letters
    with pytest.raises(shardckpt.MissingKeysError, match="'mode'"):
        shardckpt.load_all(tmp_path / "c", ["mode"])
    # A prefix must end at a path part: "mod" is not "model".
    with pytest.raises(shardckpt.MissingKeysError, match="'mod'.*top-level keys: model, optim, step"):
        shardckpt.load_all(tmp_path / "c", ["mod"])


def test_reader_reads_any_box_of_a_tensor(tmp_path):
    w = torch.randn(64, 9)
    shardckpt.save({"w": w}, tmp_path / "c")
    with shardckpt.CheckpointReader(tmp_path / "c") as reader:
        (entry,), _ = reader.select("w")
        box = shardckpt.planning.boxes.Box((10, 2), (20, 5))
        assert torch.equal(reader.read(entry, box), w[10:30, 2:7])


# --- export -------------------------------------------------------------------------------------

def test_export_round_trips_every_dtype_bit_exactly(tmp_path):
    tensors = _every_dtype()
    shardckpt.save({"model": tensors, "step": 3}, tmp_path / "c")
    result = shardckpt.export_safetensors(tmp_path / "c", tmp_path / "out", key="model")
    assert result.files == ("model.safetensors",) and result.tensors == len(tensors)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()  # one file: no index, as save_pretrained
    got = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert _bitwise_equal(got[name], t), name
    # The header: 8-byte length, padded to 8, every tensor's data aligned to its element size.
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    assert all(h["data_offsets"][0] % tensors[k].element_size() == 0 for k, h in header.items())
    assert len(raw) == 8 + n + max(h["data_offsets"][1] for h in header.values())


def test_export_shards_by_max_size_like_save_pretrained(tmp_path):
    tensors = {f"layers.{i}.weight": torch.randn(50, 40) for i in range(7)}  # 8000 bytes each
    tensors["big"] = torch.randn(100, 100)  # 40000 bytes: larger than a shard, a file of its own
    shardckpt.save({"model": tensors}, tmp_path / "c")
    result = shardckpt.export_safetensors(tmp_path / "c", tmp_path / "out", key="model", max_shard_size="20KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n = len(result.files)
    assert n > 2 and result.files == tuple(f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1))
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(result.files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values()) == result.total_size
    merged: dict[str, torch.Tensor] = {}
    for name in result.files:
        shard = safetensors_torch.load_file(out / name)
        assert sum(t.nbytes for t in shard.values()) <= 20_000 or list(shard) == ["big"]
        assert all(index["weight_map"][k] == name for k in shard)
        merged.update(shard)
    assert all(_bitwise_equal(merged[k], v) for k, v in tensors.items())


def test_export_streams_each_tensor_in_bounded_pieces(tmp_path, monkeypatch):
    w = torch.randn(300, 70)
    shardckpt.save({"w": w, "v": torch.randn(1000)}, tmp_path / "c")
    monkeypatch.setattr(st_export, "PIECE_BYTES", 4096)
    largest = []
    real_read = shardckpt.CheckpointReader.read

    def read(self, entry, box=None):
        out = real_read(self, entry, box)
        largest.append(out.nbytes)
        return out

    monkeypatch.setattr(shardckpt.CheckpointReader, "read", read)
    shardckpt.export_safetensors(tmp_path / "c", tmp_path / "out")
    assert max(largest) <= 4096 and len(largest) > 20  # never a whole tensor at once
    got = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert _bitwise_equal(got["w"], w)


def test_export_casts_floating_point_only(tmp_path):
    w, ids = torch.randn(20, 3), torch.arange(6)
    shardckpt.save({"m": {"w": w, "ids": ids, "h": w.half()}}, tmp_path / "c")
    assert main(["export", str(tmp_path / "c"), str(tmp_path / "out"), "--key", "m", "--dtype", "bf16"]) == 0
    got = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert _bitwise_equal(got["w"], w.bfloat16()) and _bitwise_equal(got["h"], w.half().bfloat16())
    assert _bitwise_equal(got["ids"], ids)


def test_export_names_key_selection_and_prefix_strip(tmp_path):
    model = {"_orig_mod.embed.weight": torch.randn(4, 2), "_orig_mod.head": {"bias": torch.ones(2)}}
    shardckpt.save({"model": model, "optim": {"state": {0: {"exp_avg": torch.ones(3)}}}, "step": 1}, tmp_path / "c")
    r = shardckpt.export_safetensors(tmp_path / "c", tmp_path / "a", key="model", prefix_strip="_orig_mod.")
    got = safetensors_torch.load_file(tmp_path / "a" / "model.safetensors")
    assert set(got) == {"embed.weight", "head.bias"} and torch.equal(got["embed.weight"], model["_orig_mod.embed.weight"])
    assert r.skipped_values == 0
    # No key: every global tensor, the whole path joined with "."; values are counted, not written.
    r = shardckpt.export_safetensors(tmp_path / "c", tmp_path / "b")
    got = safetensors_torch.load_file(tmp_path / "b" / "model.safetensors")
    assert set(got) == {"model._orig_mod.embed.weight", "model._orig_mod.head.bias", "optim.state.0.exp_avg"}
    assert r.skipped_values == 1


def test_tied_module_weights_are_written_once(tmp_path):
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    m = Tiny()
    shardckpt.save({"model": m}, tmp_path / "c")  # a module: the tie is known and stored once
    r = shardckpt.export_safetensors(tmp_path / "c", tmp_path / "a", key="model")
    got = safetensors_torch.load_file(tmp_path / "a" / "model.safetensors")
    assert set(got) == {"embed.weight"} and r.tensors == 1
    # A plain state dict holds both names as separate tensors; tied= writes the pair once, checked.
    shardckpt.save({"model": m.state_dict()}, tmp_path / "d")
    r = shardckpt.export_safetensors(tmp_path / "d", tmp_path / "b", key="model", tied={"head.weight": "embed.weight"})
    assert set(safetensors_torch.load_file(tmp_path / "b" / "model.safetensors")) == {"embed.weight"}
    assert r.tied == {"head.weight": "embed.weight"}
    shardckpt.export_safetensors(tmp_path / "d", tmp_path / "c2", key="model")
    assert set(safetensors_torch.load_file(tmp_path / "c2" / "model.safetensors")) == {"embed.weight", "head.weight"}


def test_overwrite_replaces_an_export_and_keeps_other_files(tmp_path):
    shardckpt.save({"m": {f"w{i}": torch.randn(100) for i in range(4)}}, tmp_path / "c")
    out = tmp_path / "out"
    shardckpt.export_safetensors(tmp_path / "c", out, key="m", max_shard_size=500)
    assert (out / "model.safetensors.index.json").exists()
    (out / "config.json").write_text("{}")
    shardckpt.export_safetensors(tmp_path / "c", out, key="m", overwrite=True)
    # The old shards and index are gone: a loader meets only the new single file.
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert len(safetensors_torch.load_file(out / "model.safetensors")) == 4


def test_cli_export_json_and_numpy_reader(tmp_path, capsys):
    w = torch.randn(8, 8)
    shardckpt.save({"model": {"w": w, "rng": shardckpt.PerRank(torch.ones(2))}}, tmp_path / "c")
    assert main(["export", str(tmp_path / "c"), str(tmp_path / "out"), "--format", "safetensors", "--key", "model",
                 "--max-shard-size", "5GB", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"] == ["model.safetensors"] and doc["tensors"] == 1 and doc["skipped_per_rank"] == ["model/rng"]
    from safetensors.numpy import load_file as load_numpy

    assert (load_numpy(tmp_path / "out" / "model.safetensors")["w"] == w.numpy()).all()


@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 << 30),
                                            ("1.5kb", 1500), ("1000", 1000), (123, 123)])
def test_parse_size(text, expected):
    assert st_export.parse_size(text) == expected


# --- transformers -------------------------------------------------------------------------------

def _tiny_llama(tie: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64))


@pytest.mark.parametrize("build, as_module", [(lambda: _tiny_llama(False), False), (lambda: _tiny_llama(True), False),
                                              (_tiny_gpt2, True)], ids=["llama", "llama-tied", "gpt2-module"])
def test_transformers_from_pretrained_gives_equal_logits(tmp_path, build, as_module):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build().eval()
    saved = model if as_module else model.state_dict()
    shardckpt.save({"model": saved, "step": 5}, tmp_path / "c")
    tied = {}
    if not as_module and model.config.tie_word_embeddings:
        tied = {"lm_head.weight": "model.embed_tokens.weight"}
    r = shardckpt.export_safetensors(tmp_path / "c", tmp_path / "hf", key="model", max_shard_size="40KB", tied=tied)
    weight_map = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(r.files) > 1 and ("lm_head.weight" in weight_map) == (not model.config.tie_word_embeddings)
    model.config.save_pretrained(tmp_path / "hf")
    loaded = type(model).from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


# --- distributed export -------------------------------------------------------------------------

def _dist_export_worker(rank: int, world_size: int, ckpt: str, out: str) -> list[str]:
    import os

    torch.manual_seed(0)  # the same replicated values on every rank
    state = {"model": {f"w{i}": torch.randn(30, 20) for i in range(5)}, "rng": shardckpt.PerRank(torch.ones(2) * rank)}
    shardckpt.save(state, ckpt)
    written = []
    real = st_export._write_file

    def spy(reader, shard, path, *rest):
        written.append(os.path.basename(path))
        real(reader, shard, path, *rest)

    st_export._write_file = spy
    r = shardckpt.export_safetensors(ckpt, out, key="model", max_shard_size="5KB")
    assert r.skipped_per_rank == () and len(r.files) == 3  # rng is not under "model"
    return written


def test_distributed_export_each_rank_writes_its_own_files(tmp_path):
    from tests.dist.harness import run_ranks

    written = run_ranks(2, _dist_export_worker, str(tmp_path / "c"), str(tmp_path / "out"))
    files = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert written == [[files[0], files[2]], [files[1]]]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    torch.manual_seed(0)
    expected = {f"w{i}": torch.randn(30, 20) for i in range(5)}
    merged = {k: v for f in files for k, v in safetensors_torch.load_file(tmp_path / "out" / f).items()}
    assert set(index["weight_map"]) == set(merged) == set(expected)
    assert all(_bitwise_equal(merged[k], v) for k, v in expected.items())
