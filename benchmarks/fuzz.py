"""Fuzz campaign over checkpoint bytes (issue 10): every hostile checkpoint must end in a CheckpointError.

    python3 benchmarks/fuzz.py --cases 10000 --seed 0 --workers 2
    python3 benchmarks/fuzz.py --seed 0 --case r1234 --keep /tmp/case   # replay one case, keep its files

It saves a few small real checkpoints (float32/bf16/fp16/float64/int/bool/complex tensors, several
4 KiB blocks per tensor, zstd + byte planes and uncompressed, nested values, PerRank entries, a
fresh optimizer's state that load creates from the checkpoint, and a 2-rank save with sharded
DTensors), pins their save ids so every run sees the same bytes, then for each case copies one into
a fresh directory, applies one seeded mutation and runs ``read_index``, ``verify`` and ``load``
into a matching target. Mutations: bit flips, overwrites, truncation and junk appended to data
files or index.json; swapped, duplicated, deleted and foreign data files; random bytes, other
encodings and other checkpoints' indexes as index.json; JSON edits (fields changed, removed,
duplicated, swapped, wrong types, huge/negative numbers, long strings, deep nesting, block offsets,
lengths, codecs, checksums, shapes, dtypes, ranks, save ids, typed-JSON values); and "forged"
blocks whose bytes are damaged with the checksum recomputed, so the zstd and byte-plane decoders
see hostile input. Three kinds rewrite a checkpoint validly (a tensor re-stored as 1 to ~100 boxes
in raw/zstd/plane blocks with gaps between them; the index reordered, re-spaced, with unknown
fields; files the index does not list added): these must load bit-exactly and verify. A fixed set
of special-file cases (directories, FIFOs, symlinks where files belong, and an intact checkpoint
read with only 512 MiB of address space to spare) runs once after the random cases.

Each operation must succeed or raise a CheckpointError subclass. A case is a FAILURE when:
- an operation raises anything else, or the bare ``CheckpointError`` base class (only the
  library's wrappers around unexpected internal exceptions raise it);
- ``load`` succeeds but a tensor the target held differs from the saved one (bit-exact), or the
  data files were damaged and anything loaded differs;
- ``verify`` passes although a data file the index lists was changed, or an operation fails
  on a checkpoint whose index and listed data files are intact, or on a valid rewrite;
- an operation takes longer than 10 s, or a case raises its process's peak RSS by more than
  ``--max-rss-mib``, or the worker running it hangs or dies.

Successful loads that differ only where the format cannot tell are counted apart, as
"undetectable": index.json carries no checksum, so an edit of an inline value (``step``) or of
the dtype of a tensor that load creates from the index is invisible by design, and so is a
forged block (bytes changed, checksum recomputed). They are reported, never counted as passes.

Cases run in worker processes (``--workers``); each reports its wall time, the tracemalloc peak of
its Python allocations and its peak RSS above the RSS it started at (VmHWM, reset per case through
/proc/self/clear_refs). Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import queue
import random
import resource
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    import torch

# A JSON document under edit: any shape at any point, which is the point.
Json = Any

SLOW_S = 10.0  # an operation slower than this is a failure
HANG_S = 12.0  # the worker interrupts an operation blocked this long (main thread only)
KILL_S = 40.0  # the parent kills a worker silent this long on one case
BLOCK_BYTES = 4096
LIMITED = "intact, with 512 MiB of address space to spare"
FUZZED = ("z1", "n1", "z2")  # z1b is z1's data under another save id: a source of foreign files
OPS = ("read_index", "verify", "load")


# --- the checkpoints ----------------------------------------------------------------------------


class Holder:
    """A stateful object (an optimizer or scheduler stand-in)."""

    def __init__(self, state: dict[str, object]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, object]:
        return self.state

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.state = state


def _single_tensors(seed: int) -> dict[str, torch.Tensor]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(48, 40, generator=g),  # float32, 7680 B: two blocks
        "long": torch.randn(2, 1100, generator=g),  # rows longer than a block: cut along the last dim
        "emb": (torch.randn(40, 64, generator=g) * 0.02).to(torch.bfloat16),
        "half": torch.randn(2500, generator=g).to(torch.float16),
        "f64": torch.randn(600, generator=g).to(torch.float64),
        "ids": torch.randint(-1000, 1000, (1100,), generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (33, 7), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 256, (300,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(7, 9, generator=g) > 0.5,
        "c64": torch.randn(5, 3, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(2.5 + seed, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }


def _single_extra(seed: int) -> dict[str, object]:
    import torch

    g = torch.Generator().manual_seed(seed + 100)
    return {"exp_avg": torch.randn(3000, generator=g).to(torch.float16),
            "counts": torch.randint(0, 256, (40, 3), generator=g, dtype=torch.uint8),
            "rng": torch.randint(0, 256, (16,), generator=g, dtype=torch.uint8)}


def _groups(lr: float) -> list[dict[str, object]]:
    return [{"lr": lr, "betas": (0.9, 0.95), "name": "g0", "eps": 1e-8}]


def single_state(seed: int) -> dict[str, object]:
    from shardckpt import PerRank

    extra = _single_extra(seed)
    return {
        **_single_tensors(seed),
        "opt": Holder({"state": {0: {"exp_avg": extra["exp_avg"], "counts": extra["counts"], "step": 3}},
                       "param_groups": _groups(0.1)}),
        "rng": PerRank(extra["rng"]),
        "pos": PerRank({"epoch": 2, "offset": 12345}),
        "step": 7 + seed,
        "cfg": {"name": "fuzz", "nan": float("nan"), "ninf": float("-inf"), 3: "int key", "$x": 1,
                "t": (1, "a", None), "nested": {"a": [1, [2, [3.5]]]}, "big": 2**64 - 1, "neg": -(2**63)},
    }


def single_target() -> dict[str, object]:
    import torch

    from shardckpt import PerRank

    # "opt" is a fresh optimizer: its state (a tensor and a value) is created from the checkpoint.
    target: dict[str, object] = {k: torch.zeros_like(v) for k, v in _single_tensors(0).items()}
    target.update(opt=Holder({"state": {}, "param_groups": _groups(0.0)}), rng=PerRank(torch.zeros(16, dtype=torch.uint8)),
                  pos=PerRank(None), step=0, cfg=None)
    return target


def dist_tensors() -> dict[str, torch.Tensor]:
    import torch

    g = torch.Generator().manual_seed(2)
    return {"w": torch.randn(64, 40, generator=g), "col": torch.randn(16, 64, generator=g),
            "ids": torch.randint(-(2**20), 2**20, (1200,), generator=g, dtype=torch.int32),
            "b": torch.randn(300, generator=g).to(torch.bfloat16)}


def dist_state(rank: int) -> dict[str, object]:
    """What a rank of the 2-rank job holds, as plain tensors (the builder makes DTensors of w/col/ids)."""
    import torch

    from shardckpt import PerRank

    return {**dist_tensors(), "r": PerRank(torch.full((8,), rank + 1, dtype=torch.int16)),
            "pos": PerRank({"rank": rank}), "step": 5}


def dist_target() -> dict[str, object]:
    import torch

    from shardckpt import PerRank

    target: dict[str, object] = {k: torch.zeros_like(v) for k, v in dist_tensors().items()}
    target.update(r=PerRank(torch.zeros(8, dtype=torch.int16)), pos=PerRank(None), step=0)
    return target


def _build_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank of the 2-rank save (run as a subprocess of the builder)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import shardckpt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    state = dist_state(rank)
    full = dist_tensors()
    for key, dim in (("w", 0), ("col", 1), ("ids", 0)):
        state[key] = distribute_tensor(full[key], mesh, [Shard(dim)])
    shardckpt.save(state, out, compression=shardckpt.CompressionOptions(block_bytes=BLOCK_BYTES))
    # Teardown as the docs ask: shardckpt's threads and groups first, then both ranks together, so
    # neither closes its gloo connections while the other still uses them (an abort at exit,
    # "terminate called without an active exception", was seen twice in fresh-clone CI runs).
    shardckpt.shutdown()
    dist.barrier()
    dist.destroy_process_group()


def _pin_save_id(root: Path, save_id: str) -> None:
    """Give a saved checkpoint a fixed save id (index, file names, data file headers), so every run
    of the campaign mutates the same bytes and a case number is a reproducer."""
    doc = json.loads((root / "index.json").read_bytes())
    old = doc["save_id"]
    for f in doc["files"]:
        new_name = f["name"].replace(old, save_id)
        data = bytearray((root / f["name"]).read_bytes())
        data[16:64] = save_id.encode().ljust(48, b"\0")
        (root / new_name).write_bytes(bytes(data))
        (root / f["name"]).unlink()
        f["name"] = new_name
    doc["save_id"] = save_id
    (root / "index.json").write_bytes(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())


def build_checkpoints(base: Path, log: Callable[[str], None]) -> None:
    """Save the checkpoints the cases start from. With one I/O thread, blocks land in the data files
    in plan order, and with pinned save ids the bytes are the same on every run."""
    import shardckpt

    zstd = shardckpt.CompressionOptions(block_bytes=BLOCK_BYTES)
    none = shardckpt.CompressionOptions(codec="none", block_bytes=BLOCK_BYTES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDCKPT_IO_THREADS": "1"}
    saved = os.environ.get("SHARDCKPT_IO_THREADS")
    os.environ["SHARDCKPT_IO_THREADS"] = "1"
    try:
        for name, seed, comp in (("z1", 0, zstd), ("z1b", 0, zstd), ("n1", 1, none)):
            shardckpt.save(single_state(seed), base / name, compression=comp, metadata={"note": "fuzz", "seed": seed})
    finally:
        if saved is None:
            del os.environ["SHARDCKPT_IO_THREADS"]
        else:
            os.environ["SHARDCKPT_IO_THREADS"] = saved
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, __file__, "--build-rank", str(r), "--init", f"{tmp}/store",
                                   "--out", str(base / "z2")], env=env) for r in range(2)]
        codes = [p.wait(timeout=300) for p in procs]
        if any(codes):
            # The exit codes tell an abort at teardown (-6, SIGABRT) from an error (1); it was
            # seen once in CI as "terminate called without an active exception".
            raise SystemExit(f"building the 2-rank checkpoint failed (exit codes by rank: {codes})")
    for name in ("z1", "z1b", "n1", "z2"):
        _pin_save_id(base / name, hashlib.sha256(name.encode()).hexdigest()[:16])
        report = shardckpt.verify(base / name)
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((base / name).rglob("*.bin")))).hexdigest()[:12]
        log(f"  {name}: {report.files} file(s), {report.tensors} tensors, {report.blocks} blocks, "
            f"{report.bytes_stored} stored / {report.bytes_raw} raw bytes, data sha256 {digest}")


# --- what a worker knows ------------------------------------------------------------------------


@dataclass
class Ckpt:
    """A pristine checkpoint, and the bytes of its index and data files (to restore or compare)."""

    name: str
    root: Path
    index: bytes
    files: dict[str, bytes]  # listed data file name -> its bytes

    @property
    def doc(self) -> Json:
        return json.loads(self.index)  # a fresh copy to edit


class Env:
    """What a worker holds for every case: the pristine checkpoints and what loading each must give."""

    def __init__(self, base: Path, seed: int, scratch: Path, max_rss: int) -> None:
        self.base, self.seed, self.scratch, self.max_rss = base, seed, scratch, max_rss
        self.ckpts: dict[str, Ckpt] = {}
        for name in ("z1", "z1b", "n1", "z2"):
            root = base / name
            index = (root / "index.json").read_bytes()
            names = [f["name"] for f in json.loads(index)["files"]]
            self.ckpts[name] = Ckpt(name, root, index, {n: (root / n).read_bytes() for n in names})
        self.expected = {"z1": _plain(single_state(0)), "n1": _plain(single_state(1)), "z2": _plain(dist_state(0))}

    def target(self, name: str) -> dict[str, object]:
        return dist_target() if name == "z2" else single_target()


def _preallocated(name: str) -> set[str]:
    """Top-level keys whose tensors the load target holds before the load: these must come back
    bit-exact whatever the index says (load checks their dtype and shape against the index)."""
    if name == "z2":
        return {"w", "col", "ids", "b", "r"}
    return {"w", "long", "emb", "half", "f64", "ids", "i32", "u8", "mask", "c64", "scalar", "empty", "rng"}


def _plain(x: object) -> object:
    from shardckpt import PerRank

    if isinstance(x, Holder):
        return _plain(x.state)
    if isinstance(x, PerRank):
        return ("PerRank", _plain(x.value))
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    return x


def _differences(want: object, got: object, path: tuple[object, ...], out: list[tuple[object, ...]]) -> None:
    import torch

    if isinstance(want, torch.Tensor):
        same = (isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
                and torch.equal(got.contiguous().reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)))
        if not same:
            out.append(path)
    elif type(want) is not type(got):
        out.append(path)
    elif isinstance(want, dict):
        assert isinstance(got, dict)
        if set(want) != set(got):  # a dict load creates fills in index order: order is no property
            out.append(path)
        else:
            for k in want:
                _differences(want[k], got[k], path + (k,), out)
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple)
        if len(want) != len(got):
            out.append(path)
        else:
            for i, (a, b) in enumerate(zip(want, got)):
                _differences(a, b, path + (i,), out)
    elif isinstance(want, float):
        assert isinstance(got, float)
        if struct.pack("<d", want) != struct.pack("<d", got):
            out.append(path)
    elif want != got:
        out.append(path)


# --- JSON with duplicate keys and verbatim text -------------------------------------------------


class Raw(str):
    """Emitted verbatim: deep nesting, huge numbers, NaN literals."""


class Pairs(list[tuple[str, Json]]):
    """An object given as (key, value) pairs, so keys can repeat."""


def dump(node: object) -> str:
    if isinstance(node, Raw):
        return str(node)
    if isinstance(node, Pairs | dict):
        items = node if isinstance(node, Pairs) else list(node.items())
        return "{" + ",".join(f"{json.dumps(k)}:{dump(v)}" for k, v in items) + "}"
    if isinstance(node, list):
        return "[" + ",".join(dump(v) for v in node) + "]"
    return json.dumps(node)  # floats: inf becomes the non-standard literal Infinity, on purpose


def _deep(rng: random.Random) -> Raw:
    n = rng.choice([63, 64, 65, 200, 1000, 100_000])
    if rng.random() < 0.5:
        return Raw("[" * n + "1" + "]" * n)
    return Raw('{"a":' * n + "1" + "}" * n)


def _hostile(rng: random.Random, old: Json = None) -> Json:
    """A value that is wrong for most fields: wrong type, out of range, huge, or odd."""
    pick = rng.randrange(7)
    if pick == 0 and isinstance(old, int) and not isinstance(old, bool):
        return rng.choice([old + 1, old - 1, -old, old * 2, old // 2, 0, -1, old + 2**32, old + 2**63, float(old),
                           str(old), True, Raw(f"{old}.0"), Raw(f"{old}e0")])
    if pick == 1:
        return rng.choice([2**31, 2**32, 2**48, 2**48 + 1, 2**56, 2**56 + 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30),
                           Raw("1" + "0" * 5000), Raw("1e400"), Raw("-1e400"), Raw("-0"), Raw("1E2")])
    if pick == 2:
        return rng.choice([None, True, False, 0, -1, 1, 0.5, -0.0, 1e308, float("inf"), float("nan"), Raw("NaN")])
    if pick == 3:
        return rng.choice(["", "x", "x" * (1 << rng.randrange(8, 21)), "\u0000", "\ud800", "\udc80x", "a/b", "$float",
                           "data/../index.json", "../../etc/passwd", "/etc/passwd", "data/x\n", "\u00ff\u4e2d", "float32",
                           "zstd", "planes", "raw", "0" * 16, "shardckpt"])
    if pick == 4:
        return rng.choice([[], [0], [-1], [[]], [None] * 8, {}, {"a": 1}, {"$float": "nan"}, {"$tuple": 5},
                           {"$dict": [[[1], 2]]}, {"$dict": [[1, 2], [1, 3]]}, {"$x": 1}, {"$float": "inf", "x": 1}])
    if pick == 5:
        return _deep(rng)
    if isinstance(old, str) and old:
        i = rng.randrange(len(old))
        return old[:i] + chr(rng.randrange(32, 0x2FF)) + old[i + 1:]
    return rng.choice([[old], {"v": old}, [old, old]])


def _sites(doc: Json) -> list[tuple[Json, Json]]:
    """Every (container, key) in the document."""
    out: list[tuple[Json, Json]] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for k, v in items:
            out.append((node, k))
            if isinstance(v, dict | list):
                stack.append(v)
    return out


def _write_index(d: Path, doc: object) -> None:
    (d / "index.json").write_text(dump(doc))


# --- mutations ----------------------------------------------------------------------------------
# Each takes (rng, case dir, the pristine checkpoint, env) and returns a one-line description.


def _data_name(rng: random.Random, ck: Ckpt) -> str:
    return rng.choice(sorted(ck.files))


def _flip_bits(rng: random.Random, data: bytearray, lo: int, hi: int, max_flips: int = 8) -> list[int]:
    where = []
    for _ in range(rng.randint(1, max_flips)):
        pos = rng.randrange(lo, hi)
        data[pos] ^= 1 << rng.randrange(8)
        where.append(pos)
    return where


def m_data_bitflip(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    name = _data_name(rng, ck)
    data = bytearray(ck.files[name])
    lo, hi = (0, 64) if rng.random() < 0.25 else (0, len(data))
    where = _flip_bits(rng, data, lo, hi)
    (d / name).write_bytes(bytes(data))
    return f"{name} bits at {where}"


def m_data_overwrite(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    name = _data_name(rng, ck)
    data = bytearray(ck.files[name])
    start = rng.randrange(len(data))
    n = min(len(data) - start, rng.choice([1, 4, 16, 64, 512, 4096]))
    fill = rng.choice(["zeros", "ones", "random"])
    data[start:start + n] = {"zeros": b"\0" * n, "ones": b"\xff" * n, "random": rng.randbytes(n)}[fill]
    (d / name).write_bytes(bytes(data))
    return f"{name} [{start}, {start + n}) := {fill}"


def m_data_truncate(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    name = _data_name(rng, ck)
    size = rng.choice([0, rng.randrange(64), rng.randrange(len(ck.files[name]))])
    (d / name).write_bytes(ck.files[name][:size])
    return f"{name} truncated to {size}"


def m_data_extend(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    name = _data_name(rng, ck)
    n = rng.choice([1, 7, 64, 4096])
    with open(d / name, "ab") as f:
        f.write(rng.randbytes(n))
    return f"{name} + {n} junk bytes"


def m_data_swap(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    a, b = rng.sample(sorted(ck.files), 2)
    (d / a).write_bytes(ck.files[b])
    (d / b).write_bytes(ck.files[a])
    return f"swapped {a} and {b}"


def m_data_duplicate(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    src = _data_name(rng, ck)
    rank = int(src[-9:-4])
    other = rng.choice([r for r in range(4) if r != rank])
    dst = f"{src[:-9]}{other:05d}.bin"
    (d / dst).write_bytes(ck.files[src])
    return f"{src} copied to {dst}"


def m_data_delete(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    if rng.random() < 0.2:
        shutil.rmtree(d / "data")
        return "data/ deleted"
    name = _data_name(rng, ck)
    (d / name).unlink()
    return f"{name} deleted"


def m_data_foreign(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """A data file from another save in place of ours: z1b holds z1's data under another save id,
    so its file has the same size and only the header tells them apart."""
    name = _data_name(rng, ck)
    source = env.ckpts["z1b"] if ck.name == "z1" else env.ckpts[rng.choice([n for n in FUZZED if n != ck.name])]
    other = rng.choice(sorted(source.files))
    (d / name).write_bytes(source.files[other])
    return f"{name} replaced by {source.name}/{other}"


def m_index_bitflip(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    data = bytearray(ck.index)
    where = _flip_bits(rng, data, 0, len(data), 4)
    (d / "index.json").write_bytes(bytes(data))
    return f"index.json bits at {where}"


def m_index_truncate(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    size = rng.randrange(len(ck.index))
    (d / "index.json").write_bytes(ck.index[:size])
    return f"index.json truncated to {size}"


def m_index_extend(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    junk = rng.choice([rng.randbytes(rng.randint(1, 64)), b"\n", b" ", b"\0", b"{}", b',"x":1}', b"\xef\xbb\xbf"])
    (d / "index.json").write_bytes(ck.index + junk)
    return f"index.json + {junk[:16]!r}"


def m_index_replace(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    pick = rng.randrange(6)
    if pick == 0:
        data, what = rng.randbytes(rng.randint(0, 4096)), "random bytes"
    elif pick == 1:
        data, what = bytes(rng.randrange(32, 127) for _ in range(rng.randint(1, 512))), "random ASCII"
    elif pick == 2:
        tokens = ["{", "}", "[", "]", ",", ":", '"format"', '"shardckpt"', '"files"', "1", "-1", "null", "true", '"x"', "1e9"]
        data, what = " ".join(rng.choice(tokens) for _ in range(rng.randint(1, 200))).encode(), "random JSON tokens"
    elif pick == 3:
        data, what = b"", "empty"
    elif pick == 4:
        other = env.ckpts[rng.choice(["z1b", *[n for n in FUZZED if n != ck.name]])]
        data, what = other.index, f"{other.name}'s index"
    else:
        (d / "index.json").unlink()
        return "index.json deleted"
    (d / "index.json").write_bytes(data)
    return f"index.json := {what}"


def m_index_encoding(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    text = ck.index.decode()
    pick = rng.randrange(5)
    if pick == 0:
        data, what = b"\xef\xbb\xbf" + ck.index, "UTF-8 byte order mark"
    elif pick == 1:
        enc = rng.choice(["utf-16", "utf-16-le", "utf-32"])
        data, what = text.encode(enc), enc
    elif pick == 2:  # a UTF-8 encoded surrogate inside a key
        data, what = ck.index.replace(b'"key":"', b'"key":"\xed\xa0\x80', 1), "encoded surrogate in a key"
    elif pick == 3:
        data, what = ck.index.replace(b'"key":"', b'"key":"\\ud800', 1), "escaped lone surrogate in a key"
    else:
        data, what = ck.index.replace(b'"key":"', b'"key":"\xff', 1), "invalid UTF-8 byte in a key"
    (d / "index.json").write_bytes(data)
    return f"index.json as {what}"


def m_json_generic(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """One random structural edit anywhere in the document."""
    doc = ck.doc
    sites = _sites(doc)
    node, key = rng.choice(sites)
    op = rng.choice(["set", "set", "remove", "dup-key", "dup-item", "swap", "wrap", "deep"])
    old = node[key]
    was = _short(old)
    if op == "remove":
        del node[key]
    elif op == "dup-key" and isinstance(node, dict):
        pairs = Pairs(node.items())
        pairs.append((key, old if rng.random() < 0.5 else _hostile(rng, old)))
        if node is doc:
            doc = pairs
        else:
            _replace(doc, node, pairs)
    elif op == "dup-item" and isinstance(old, list) and old:
        old.append(old[rng.randrange(len(old))])
    elif op == "swap" and isinstance(node, list) and len(node) > 1:
        i = rng.randrange(len(node))
        node[key], node[i] = node[i], node[key]
    elif op == "wrap":
        node[key] = rng.choice([[old], {"v": old}])
    elif op == "deep":
        node[key] = _deep(rng)
    else:
        op = "set"
        node[key] = _hostile(rng, old)
    _write_index(d, doc)
    return f"{op} at {key!r} (was {was})"


def _replace(doc: Json, old: Json, new: Json) -> None:
    """Put ``new`` where the container ``old`` sits in ``doc``."""
    stack = [doc]
    while stack:
        node = stack.pop()
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for k, v in items:
            if v is old:
                node[k] = new
                return
            if isinstance(v, dict | list):
                stack.append(v)


def _short(x: object) -> str:
    text = json.dumps(x) if not isinstance(x, Raw) else str(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _all_blocks(doc: Json) -> list[tuple[Json, Json]]:
    return [(t, b) for t in doc["tensors"] for b in t["blocks"]]


def m_json_block(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """One field of one block: box, file, offset, length, raw length, codec or checksum."""
    doc = ck.doc
    blocks = _all_blocks(doc)
    t, b = rng.choice(blocks)
    _, other = rng.choice(blocks)
    field = rng.randrange(8)
    old = b[field]
    if field in (0, 1):
        dims = list(old)
        pick = rng.randrange(6)
        if pick == 0 and dims:
            i = rng.randrange(len(dims))
            dims[i] += rng.choice([-1, 1, 2**48, -(dims[i] + 1)])
        elif pick == 1:
            dims = list(other[field])
        elif pick == 2:
            dims.append(rng.choice([0, 1]))
        elif pick == 3:
            dims = dims[:-1]
        elif pick == 4 and dims:
            dims[rng.randrange(len(dims))] = _hostile(rng, dims[0])
        else:
            dims = _hostile(rng, dims)
        b[field] = dims
    elif field == 2:
        b[field] = rng.choice([old + 1, old - 1, len(doc["files"]), -1, "0", 0.0, None, True, 2**64])
    elif field in (3, 4, 5):
        size = doc["files"][b[2]]["size"]
        b[field] = rng.choice([old + 1, old - 1, old + 8, old - 8, other[field], 0, 63, 64, size, size - old, 2**31,
                               2**31 + 2**20 + 1, 2**56, 2**63, -1, _hostile(rng, old)])
    elif field == 6:
        b[field] = rng.choice([c for c in ("raw", "zstd", "planes", "lz4", "", "RAW", None, 0) if c != old])
    else:
        i = rng.randrange(16)
        b[field] = rng.choice([other[7], old.upper(), old[:15], old + "0", "0" * 16, old[:i] + "0123456789abcdef"[
            (int(old[i], 16) + rng.randint(1, 15)) % 16] + old[i + 1:], _hostile(rng, old)])
    _write_index(d, doc)
    return f"tensor {t['key']!r} block field {field}: {_short(old)} -> {_short(b[field])}"


def m_json_tensor(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """One field of one tensor entry: dtype, shape, rank, key, path or block list."""
    doc = ck.doc
    t = rng.choice(doc["tensors"])
    field = rng.choice(["dtype", "dtype", "shape", "shape", "rank", "key", "path", "blocks"])
    old = t.get(field)
    if field == "dtype":
        from shardckpt.format.schema import DTYPES

        t[field] = rng.choice([*sorted(DTYPES), "float128", "Float32", "torch.float32", "", "bool ", _hostile(rng, old)])
    elif field == "shape":
        shape = list(old)
        pick = rng.randrange(7)
        if pick == 0:
            rng.shuffle(shape)
        elif pick == 1 and shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1])
        elif pick == 2:
            shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 0]))
        elif pick == 3:
            shape = shape[1:]
        elif pick == 4:
            shape = [math.prod(shape)] if shape else [1]
        elif pick == 5:
            shape = rng.choice([[2**48] * 3, [0, 2**48, 2**48], [1] * 65, [-1], [2**64]])
        else:
            shape = _hostile(rng, shape)
        t[field] = shape
    elif field == "rank":
        t[field] = rng.choice([None, 0, 1, 2, -1, doc["world_size"], "0", True, 0.0])
    elif field == "key":
        t[field] = rng.choice([old + "x", rng.choice(doc["tensors"])["key"], "", old.upper(), _hostile(rng, old)])
    elif field == "path":
        path = list(old)
        t[field] = rng.choice([path + ["x"], path[:-1], [str(p) for p in path], [p if not isinstance(p, str) or not p.isdigit()
                               else int(p) for p in path], [*path[:-1], f"{path[-1]}\u0000"], [True], [], ["x"] * 300])
    else:
        blocks = list(old)
        pick = rng.randrange(4)
        if pick == 0:
            t[field] = []
        elif pick == 1 and blocks:
            del blocks[rng.randrange(len(blocks))]
            t[field] = blocks
        elif pick == 2 and blocks:
            t[field] = blocks + [blocks[rng.randrange(len(blocks))]]
        else:
            t[field] = blocks[::-1] + [[0] * 8]
    if rng.random() < 0.1:
        del t[field]
    _write_index(d, doc)
    return f"tensor {_short(t.get('key'))} {field}: {_short(old)} -> {_short(t.get(field, '<removed>'))}"


def m_json_top(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """A top-level field or a files[] entry: format, version, save id, world size, file names/sizes/ranks."""
    doc = ck.doc
    field = rng.choice(["format", "version", "save_id", "save_id", "world_size", "metadata", "files", "files", "files",
                        "tensors", "values"])
    old = doc.get(field)
    if field == "save_id":
        doc[field] = rng.choice([env.ckpts["z1b"].doc["save_id"], old.upper(), old[:7], old + "\n",
                                 "".join(rng.choice("0123456789abcdef") for _ in range(rng.choice([8, 16, 48, 49]))),
                                 _hostile(rng, old)])
    elif field == "files" and doc["files"]:
        f = rng.choice(doc["files"])
        sub = rng.choice(["name", "size", "rank", "drop", "dup", "extra"])
        if sub == "name":
            others = [g["name"] for g in doc["files"] if g is not f] or ["data/nothing.bin"]
            f["name"] = rng.choice([*others, "data/../index.json", "index.json", "/etc/passwd", "data/.", "data/x\n",
                                    "data/" + "a" * 300, "data//x", f["name"].upper(), _hostile(rng, f["name"])])
        elif sub == "size":
            f["size"] = rng.choice([f["size"] + 1, f["size"] - 1, 0, 63, 64, 2**56, 2**56 + 1, _hostile(rng, f["size"])])
        elif sub == "rank":
            f["rank"] = rng.choice([f["rank"] + 1, -1, doc["world_size"], None, "0", _hostile(rng, f["rank"])])
        elif sub == "drop":
            doc["files"].remove(f)
        elif sub == "dup":
            doc["files"].append(dict(f))
        else:
            doc["files"].append({"name": "data/extra.bin", "rank": 0, "size": 64})
        field = f"files.{sub}"
    elif field == "world_size":
        doc[field] = rng.choice([0, 1, 2, 3, 2**24, 2**24 + 1, -1, 1.0, True, "1"])
    elif field == "version":
        doc[field] = rng.choice([0, 2, -1, "1", 1.0, True, None, 2**64])
    elif field == "format":
        doc[field] = rng.choice(["Shardckpt", "", "shardckpt\n", None, 1])
    else:
        doc[field] = _hostile(rng, old)
    if rng.random() < 0.1 and field in doc:
        del doc[field]
    _write_index(d, doc)
    return f"{field}: {_short(old)} -> {_short(doc.get(field.split('.')[0], '<removed>'))}"


def m_json_value(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """A typed-JSON value (values[].value or metadata), or a value entry's key/path/rank."""
    doc = ck.doc
    if rng.random() < 0.2:
        old = doc.get("metadata")
        doc["metadata"] = rng.choice([_hostile(rng, old), {"$tuple": [1]}, {"$dict": [["k", 1]]}, {"a": _hostile(rng)}])
        _write_index(d, doc)
        return f"metadata -> {_short(doc['metadata'])}"
    v = rng.choice(doc["values"])
    field = rng.choice(["value", "value", "value", "key", "path", "rank"])
    old = v.get(field)
    was = _short(old)
    if field == "value":
        sites = _sites(old) if isinstance(old, dict | list) else []
        if sites and rng.random() < 0.6:
            node, key = rng.choice(sites)
            node[key] = _hostile(rng, node[key])
        else:
            v[field] = _hostile(rng, old)
    elif field == "rank":
        v[field] = rng.choice([None, 0, 1, -1, 2**24, "0", True])
    else:
        v[field] = _hostile(rng, old)
    if rng.random() < 0.1:
        del v[field]
    _write_index(d, doc)
    return f"value {_short(v.get('key'))} {field}: {was} -> {_short(v.get(field, '<removed>'))}"


def _checksum(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)


def m_forge_block(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """Damage one block's stored bytes and recompute its checksum: the decoders see the damage.
    A payload of another length goes to the end of the file (file size updated)."""
    import zstandard

    doc = ck.doc
    t, b = rng.choice(_all_blocks(doc))
    name = doc["files"][b[2]]["name"]
    data = bytearray(ck.files[name])
    off, length, raw_length, codec = b[3], b[4], b[5], b[6]
    payload = bytearray(data[off:off + length])
    pick = rng.randrange(6)
    if pick == 0 and payload:
        what = f"bits at {_flip_bits(rng, payload, 0, min(len(payload), 32) if rng.random() < 0.5 else len(payload), 4)}"
    elif pick == 1 and codec == "planes":
        n = payload[0]
        part = rng.choice(["n", "flag", "length", "lengths-swap"])
        if part == "n":
            payload[0] = rng.choice([0, 1, 2, 4, 8, 255])
        elif part == "flag":
            payload[1 + rng.randrange(n)] = rng.choice([0, 1, 2, 255])
        elif part == "length":
            i = rng.randrange(n)
            at = 1 + n + 8 * i
            old = struct.unpack_from("<Q", payload, at)[0]
            struct.pack_into("<Q", payload, at, rng.choice([0, old + 1, max(old - 1, 0), 2**63, 2**64 - 1, rng.getrandbits(64)]))
        else:
            i, j = rng.sample(range(n), 2)
            a, c = 1 + n + 8 * i, 1 + n + 8 * j
            payload[a:a + 8], payload[c:c + 8] = payload[c:c + 8], payload[a:a + 8]
        what = f"plane header {part}"
    elif pick == 2 and codec in ("zstd", "raw"):
        raw = bytes(rng.randbytes(raw_length) if codec == "raw" else data[off:off + length])
        if codec == "zstd":
            raw = zstandard.ZstdDecompressor().decompress(raw)
        variant = rng.choice(["no-size", "wrong-size", "trailing", "skippable", "other-data", "two-frames", "empty"])
        cctx = zstandard.ZstdCompressor(write_content_size=variant != "no-size")
        if variant == "wrong-size":
            raw = raw + b"\0" * rng.choice([1, 4096]) if rng.random() < 0.5 else raw[:-1]
        if variant == "other-data":
            raw = rng.randbytes(len(raw))
        frame = cctx.compress(b"" if variant == "empty" else raw)
        if variant == "trailing":
            frame += rng.randbytes(rng.randint(1, 8))
        elif variant == "skippable":
            frame += struct.pack("<II", 0x184D2A50, 4) + b"abcd"
        elif variant == "two-frames":
            frame += cctx.compress(raw)
        payload = bytearray(frame)
        b[6] = "zstd"
        what = f"re-encoded as a zstd frame ({variant})"
    elif pick == 3 and len(payload) > 1:
        cut = rng.randrange(1, len(payload))
        payload = payload[:cut] if rng.random() < 0.5 else payload[cut:]
        what = f"cut to {len(payload)} bytes"
    elif pick == 4:
        payload = bytearray(payload + rng.randbytes(rng.choice([1, 64])))
        what = f"grown to {len(payload)} bytes"
    else:
        payload = bytearray(rng.randbytes(max(1, len(payload))))
        what = "random bytes"
    if len(payload) == length:
        data[off:off + length] = payload
    else:
        b[3] = len(data)
        data += payload
        doc["files"][b[2]]["size"] = len(data)
    b[4] = len(payload)
    b[7] = _checksum(bytes(payload))
    (d / name).write_bytes(bytes(data))
    _write_index(d, doc)
    return f"tensor {t['key']!r} {codec} block at {off}: {what}, checksum recomputed"


def m_forge_boxes(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """Swap the boxes (offsets, or offsets and sizes) of two blocks of one tensor."""
    doc = ck.doc
    tensors = [t for t in doc["tensors"] if len(t["blocks"]) > 1]
    t = rng.choice(tensors)
    b, c = rng.sample(t["blocks"], 2)
    fields = rng.choice([(0,), (1,), (0, 1)])
    for f in fields:
        b[f], c[f] = c[f], b[f]
    _write_index(d, doc)
    return f"tensor {t['key']!r}: swapped block fields {fields}"


# --- valid rewrites: another encoding of the same state, which a reader must load bit-exactly ----


def _partition(rng: random.Random, shape: list[int], cuts: int) -> list[tuple[list[int], list[int]]]:
    """Cut the box of ``shape`` into disjoint boxes by ``cuts`` random splits."""
    boxes = [([0] * len(shape), list(shape))]
    for _ in range(cuts):
        choices = [(i, dim) for i, (_, sizes) in enumerate(boxes) for dim in range(len(sizes)) if sizes[dim] >= 2]
        if not choices:
            break
        i, dim = rng.choice(choices)
        offsets, sizes = boxes.pop(i)
        cut = rng.randint(1, sizes[dim] - 1)
        first, rest_o, rest_s = list(sizes), list(offsets), list(sizes)
        first[dim] = cut
        rest_o[dim] += cut
        rest_s[dim] -= cut
        boxes += [(offsets, first), (rest_o, rest_s)]
    rng.shuffle(boxes)
    return boxes


def _encode(rng: random.Random, raw: bytes, itemsize: int, is_float: bool) -> tuple[str, bytes]:
    import zstandard

    codec = rng.choice(["raw", "zstd", "planes"] if is_float and itemsize > 1 else ["raw", "zstd"])
    if codec == "raw":
        return codec, raw
    cctx = zstandard.ZstdCompressor(level=rng.choice([-5, 1, 3, 19]), write_content_size=True)
    if codec == "zstd":
        return codec, cctx.compress(raw)
    planes = [raw[i::itemsize] for i in range(itemsize)]
    flags = [rng.randrange(2) for _ in planes]
    parts = [cctx.compress(p) if f else p for p, f in zip(planes, flags)]
    head = struct.pack(f"<B{itemsize}B{itemsize}Q", itemsize, *flags, *(len(p) for p in parts))
    return codec, head + b"".join(parts)


def m_valid_reblock(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """Re-store one tensor as a random set of boxes (1 to ~100), each raw, zstd or byte planes,
    appended after random gaps: a checkpoint another writer could have made."""
    import numpy as np
    import torch

    doc = ck.doc
    expected = env.expected[ck.name]
    assert isinstance(expected, dict)
    held = [t for t in doc["tensors"] if t["key"] in _preallocated(ck.name) and math.prod(t["shape"]) > 1]
    t = rng.choice(held)
    value = expected[t["key"]]
    tensor = value[1] if isinstance(value, tuple) else value  # PerRank
    assert isinstance(tensor, torch.Tensor)
    itemsize = tensor.element_size()
    grid = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().reshape(*tensor.shape, itemsize)
    fi = rng.randrange(len(doc["files"]))
    name = doc["files"][fi]["name"]
    data = bytearray(ck.files[name])
    blocks = []
    boxes = _partition(rng, list(tensor.shape), rng.choice([0, 1, 3, 10, 40, 100]))
    for offsets, sizes in boxes:
        raw = np.ascontiguousarray(grid[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]).tobytes()
        codec, payload = _encode(rng, raw, itemsize, tensor.is_floating_point())
        if rng.random() < 0.3:
            data += rng.randbytes(rng.randint(1, 16))  # bytes no block names: allowed, and ignored
        blocks.append([offsets, sizes, fi, len(data), len(payload), len(raw), codec, _checksum(payload)])
        data += payload
    t["blocks"] = blocks
    doc["files"][fi]["size"] = len(data)
    (d / name).write_bytes(bytes(data))
    _write_index(d, doc)
    return f"tensor {t['key']!r} re-stored as {len(blocks)} blocks in {name}"


def _shuffled_keys(rng: random.Random, node: Json, depth: int = 0) -> Json:
    if isinstance(node, list):
        return [_shuffled_keys(rng, v, depth + 1) for v in node]
    if isinstance(node, dict):
        keys = list(node)
        rng.shuffle(keys)
        return {k: _shuffled_keys(rng, node[k], depth + 1) for k in keys}
    return node


def m_valid_rewrite(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """The same index, written differently: entries, blocks and files in another order (block file
    numbers remapped), keys shuffled, unknown fields added, other whitespace and escaping."""
    doc = ck.doc
    done = []
    if rng.random() < 0.5:
        rng.shuffle(doc["tensors"])
        rng.shuffle(doc["values"])
        done.append("entries")
    if rng.random() < 0.5:
        for t in doc["tensors"]:
            rng.shuffle(t["blocks"])
        done.append("blocks")
    if rng.random() < 0.5 and len(doc["files"]) > 1:
        order = list(range(len(doc["files"])))
        rng.shuffle(order)
        doc["files"] = [doc["files"][i] for i in order]
        where = {old: new for new, old in enumerate(order)}
        for t in doc["tensors"]:
            for b in t["blocks"]:
                b[2] = where[b[2]]
        done.append("files")
    if rng.random() < 0.5:
        doc["x-unknown"] = {"any": ["thing", 1, None]}
        for entry in [*doc["tensors"], *doc["values"], *doc["files"]]:
            if rng.random() < 0.3:
                entry["x-note"] = rng.choice([1, "two", [3], {"$not": "typed"}])
        done.append("unknown fields")
    if rng.random() < 0.5:
        # Values and metadata are typed JSON, where key order is the dict's order: left alone.
        inner = {k: doc[k] for k in ("metadata",)}
        values = [v.get("value") for v in doc["values"]]
        doc = _shuffled_keys(rng, doc)
        doc.update(inner)
        for v, value in zip(doc["values"], values):
            v["value"] = value
        done.append("key order")
    text = json.dumps(doc, indent=rng.choice([None, 0, 2, "\t"]), ensure_ascii=rng.random() < 0.5,
                      separators=rng.choice([None, (",", ":"), (" , ", " : ")]))
    if rng.random() < 0.3:
        text = rng.choice([" ", "\n", "\r\n", "\t"]) + text + rng.choice([" ", "\n", "\r\n\t "])
        done.append("whitespace around")
    (d / "index.json").write_text(text, encoding="utf-8")
    return "rewritten: " + (", ".join(done) or "formatting only")


def m_valid_orphans(rng: random.Random, d: Path, ck: Ckpt, env: Env) -> str:
    """Things a reader must ignore: files the index does not list, odd names, directories, FIFOs,
    symlinks, leftover temp indexes and the lock file."""
    data = d / "data"
    made = []
    for thing in rng.sample(["bytes-name", "newline", "long", "subdir", "fifo", "symlink", "tmp-index", "lock", "stale",
                             "copy"], rng.randint(1, 4)):
        if thing == "bytes-name":
            fd = os.open(os.fsencode(data) + b"/\xff\xfe-r00000.bin", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"junk")
            os.close(fd)
        elif thing == "newline":
            (data / "x\ny.bin").write_bytes(b"junk")
        elif thing == "long":
            (data / ("a" * 250 + ".bin")).write_bytes(b"")
        elif thing == "subdir":
            (data / "sub").mkdir()
            (data / "sub" / "f.bin").write_bytes(b"junk")
        elif thing == "fifo":
            os.mkfifo(data / "pipe.bin")
        elif thing == "symlink":
            (data / "link.bin").symlink_to("/etc/passwd")
        elif thing == "tmp-index":
            (d / ".index.json.tmp-123-456").write_bytes(b"{not json")
        elif thing == "lock":
            (d / ".shardckpt.lock").write_bytes(b"")
        elif thing == "stale":
            (data / "0123456789abcdef-r00000.bin").write_bytes(rng.randbytes(200))
        else:
            src = _data_name(rng, ck)
            (data / ("ffffffffffffffff" + src[-11:])).write_bytes(ck.files[src])
        made.append(thing)
    return "added " + ", ".join(made)


@dataclass(frozen=True)
class Kind:
    apply: Callable[[random.Random, Path, Ckpt, Env], str]
    touches: str  # "index", "data" or "both"
    forged: bool = False  # keeps the checkpoint self-consistent on purpose (checksum recomputed)
    valid: bool = False  # the result is a valid checkpoint of the same state: everything must pass, bit-exact
    needs: Callable[[Ckpt], bool] = lambda ck: True


KINDS: dict[str, Kind] = {
    "data-bitflip": Kind(m_data_bitflip, "data"),
    "data-overwrite": Kind(m_data_overwrite, "data"),
    "data-truncate": Kind(m_data_truncate, "data"),
    "data-extend": Kind(m_data_extend, "data"),
    "data-swap": Kind(m_data_swap, "data", needs=lambda ck: len(ck.files) > 1),
    "data-duplicate": Kind(m_data_duplicate, "data"),
    "data-delete": Kind(m_data_delete, "data"),
    "data-foreign": Kind(m_data_foreign, "data"),
    "index-bitflip": Kind(m_index_bitflip, "index"),
    "index-truncate": Kind(m_index_truncate, "index"),
    "index-extend": Kind(m_index_extend, "index"),
    "index-replace": Kind(m_index_replace, "index"),
    "index-encoding": Kind(m_index_encoding, "index"),
    "json-generic": Kind(m_json_generic, "index"),
    "json-block": Kind(m_json_block, "index"),
    "json-tensor": Kind(m_json_tensor, "index"),
    "json-top": Kind(m_json_top, "index"),
    "json-value": Kind(m_json_value, "index"),
    "forge-block": Kind(m_forge_block, "both", forged=True),
    "forge-boxes": Kind(m_forge_boxes, "index", forged=True),
    "valid-reblock": Kind(m_valid_reblock, "both", valid=True),
    "valid-rewrite": Kind(m_valid_rewrite, "index", valid=True),
    "valid-orphans": Kind(m_valid_orphans, "data", valid=True),
}


def _special_index(kind: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        target = d / "index.json"
        target.unlink()
        if kind == "dir":
            target.mkdir()
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "dangling":
            target.symlink_to(d / "nowhere.json")
        elif kind == "loop":
            target.symlink_to(target)
        else:
            target.symlink_to(kind)
    return apply


def _special_data(kind: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        target = next((d / "data").iterdir())
        target.unlink()
        if kind == "dir":
            target.mkdir()
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "dangling":
            target.symlink_to(d / "nowhere.bin")
        elif kind == "index":
            target.symlink_to(d / "index.json")
        else:
            target.symlink_to(kind)
    return apply


def _special_root_file(d: Path) -> None:
    shutil.rmtree(d)
    d.write_bytes(b"not a directory")


def _special_data_file(d: Path) -> None:
    shutil.rmtree(d / "data")
    (d / "data").write_bytes(b"not a directory")


def _nothing(d: Path) -> None:
    pass


# Run once each, on z1: a checkpoint unpacked from an archive can hold any of these. The last one
# changes no byte: it loads an intact checkpoint with only 512 MiB of address space to spare, as
# under `ulimit -v` or a batch system's memory cap, where reserving memory the files do not need fails.
SPECIAL: list[tuple[str, Callable[[Path], None]]] = [
    ("index.json is a directory", _special_index("dir")),
    ("index.json is a FIFO", _special_index("fifo")),
    ("index.json is a dangling symlink", _special_index("dangling")),
    ("index.json is a symlink loop", _special_index("loop")),
    ("index.json is a symlink to /dev/zero", _special_index("/dev/zero")),
    ("a data file is a directory", _special_data("dir")),
    ("a data file is a FIFO", _special_data("fifo")),
    ("a data file is a symlink to /dev/zero", _special_data("/dev/zero")),
    ("a data file is a dangling symlink", _special_data("dangling")),
    ("a data file is a symlink to index.json", _special_data("index")),
    ("data/ is a regular file", _special_data_file),
    ("the checkpoint path is a regular file", _special_root_file),
    (LIMITED, _nothing),
]


# --- one case -----------------------------------------------------------------------------------


class _Hang(BaseException):
    """Raised by the alarm in an operation blocked in the main thread (a BaseException, so that no
    ``except Exception`` in the library can swallow it)."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Hang()


def _status(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _verdict(ck: Ckpt, kind: Kind, d: Path, ops: dict[str, str], got: object, env: Env) -> tuple[str, list[str]]:
    why = [f"{op} raised {out[5:]}" for op, out in ops.items() if out.startswith("FAIL ")]
    intact_index = (d / "index.json").is_file() and not (d / "index.json").is_symlink() \
        and (d / "index.json").read_bytes() == ck.index
    damaged = [n for n, data in ck.files.items() if not _same_file(d / n, data)]
    intact = intact_index and not damaged and kind.touches != "special"
    if intact:
        why += [f"{op} rejected an intact checkpoint: {out}" for op, out in ops.items()
                if out != "ok" and not out.startswith("FAIL ")]
    if intact_index and damaged and ops.get("verify") == "ok":
        why.append(f"verify passed although {damaged} changed")
    undetectable = False
    diffs: list[tuple[object, ...]] = []
    if ops.get("load") == "ok":
        _differences(env.expected[ck.name], _plain(got), (), diffs)
        held = [p for p in diffs if p and p[0] in _preallocated(ck.name)]
        other = [p for p in diffs if p not in held]
        if held and not kind.forged:
            why.append(f"load succeeded with wrong tensors {held}")
        index_only = not damaged and kind.touches == "index"
        if other and not (kind.forged or index_only):
            why.append(f"load succeeded with wrong entries {other}")
        undetectable = bool(diffs)
    if kind.valid:
        why += [f"{op} rejected a valid checkpoint: {out}" for op, out in ops.items()
                if out != "ok" and not out.startswith("FAIL ")]
        if undetectable:
            why.append(f"load returned other data than the valid checkpoint holds, at {diffs}")
    if why:
        return "FAILURE", why
    if undetectable:
        return "undetectable", []
    if all(out == "ok" for out in ops.values()):
        return "harmless", []
    return "rejected", []


def _same_file(path: Path, data: bytes) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _describe(e: BaseException) -> str:
    import shardckpt

    if isinstance(e, shardckpt.CheckpointError) and type(e) is not shardckpt.CheckpointError:
        return type(e).__name__
    cause = f" (from {type(e.__cause__).__name__}: {str(e.__cause__)[:200]})" if e.__cause__ else ""
    return f"FAIL {type(e).__name__}: {str(e)[:300]}{cause}"


class CaseResult(TypedDict):
    case: str  # "r<n>" (random) or "s<n>" (special file)
    ckpt: str
    kind: str
    detail: str  # what the mutation did
    ops: dict[str, str]  # operation -> "ok", the CheckpointError subclass raised, or "FAIL ..."
    verdict: str  # rejected, harmless, undetectable or FAILURE
    why: list[str]
    t_ops: float  # seconds, the three operations together
    py_peak: int  # tracemalloc peak during the operations, bytes
    rss_peak: int  # peak RSS above the RSS before the operations, bytes (-1: not measurable here)
    vm_hwm: int  # the worker's peak RSS after this case


def run_case(env: Env, case: str, keep: Path | None = None, trace: bool = False) -> CaseResult:
    """Mutate a fresh copy of a checkpoint as case ``case`` ("r<n>" random, "s<n>" special) says,
    run the operations, and judge the outcome."""
    import shardckpt

    rng = random.Random(f"shardckpt-fuzz:{env.seed}:{case}")
    if case.startswith("s"):
        label, special = SPECIAL[int(case[1:])]
        ck, kind_name = env.ckpts["z1"], "special-file"
        kind = Kind(lambda r, d, c, e: (special(d), label)[1], "none" if label == LIMITED else "special")
    else:
        ck = env.ckpts[rng.choice(FUZZED)]
        kind_name = rng.choice(sorted(k for k, v in KINDS.items() if v.needs(ck)))
        kind = KINDS[kind_name]
    d = keep if keep is not None else env.scratch / f"case-{case}"
    if d.exists() or d.is_symlink():
        _remove(d)
    shutil.copytree(ck.root, d, symlinks=True)
    detail = kind.apply(rng, d, ck, env)
    ops: dict[str, str] = {}
    times: dict[str, float] = {}
    got: object = None
    limit = resource.getrlimit(resource.RLIMIT_AS)
    if detail == LIMITED:
        resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + (512 << 20), limit[1]))
    rss0 = _status("VmRSS")
    have_hwm = _reset_peak_rss()
    tracemalloc.start()  # around the operations only: tracing costs the harness time it need not
    t_case = time.perf_counter()
    for op in OPS:
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
        try:
            if op == "read_index":
                shardckpt.read_index(d)
            elif op == "verify":
                shardckpt.verify(d)
            else:
                target = env.target(ck.name)
                shardckpt.load(target, d)
                got = target
            ops[op] = "ok"
        except _Hang:
            ops[op] = f"FAIL hang: blocked over {HANG_S:.0f} s"
        except Exception as e:  # noqa: BLE001 - judging every exception is the point
            ops[op] = _describe(e)
            if trace and ops[op].startswith("FAIL "):
                traceback.print_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        times[op] = time.perf_counter() - t0
        if ops[op].startswith("FAIL hang"):
            break  # the next operations would block on the same file
    t_ops = time.perf_counter() - t_case
    py_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    resource.setrlimit(resource.RLIMIT_AS, limit)
    rss_peak = max(0, _status("VmHWM") - rss0) if have_hwm else -1
    verdict, why = _verdict(ck, kind, d, ops, got, env)
    slow = [op for op, t in times.items() if t > SLOW_S]
    if slow:
        verdict, why = "FAILURE", [*why, f"{slow} took over {SLOW_S:.0f} s ({max(times.values()):.1f} s)"]
    if rss_peak > env.max_rss:
        verdict, why = "FAILURE", [*why, f"peak RSS rose by {rss_peak / 2**20:.0f} MiB"]
    if keep is None:
        _remove(d)
    return CaseResult(case=case, ckpt=ck.name, kind=kind_name, detail=detail, ops=ops, verdict=verdict, why=why,
                      t_ops=t_ops, py_peak=py_peak, rss_peak=rss_peak, vm_hwm=_status("VmHWM"))


def _remove(d: Path) -> None:
    if d.is_dir() and not d.is_symlink():
        shutil.rmtree(d, ignore_errors=True)
    else:
        d.unlink(missing_ok=True)


# --- workers ------------------------------------------------------------------------------------


def worker_main(base: Path, seed: int, max_rss: int) -> None:
    """Read case names on stdin, answer one JSON line each on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the protocol
    logging.disable(logging.CRITICAL)  # verify warns about orphans; counted, not printed
    signal.signal(signal.SIGALRM, _on_alarm)
    with tempfile.TemporaryDirectory(prefix="worker-", dir=base.parent) as scratch:
        env = Env(base, seed, Path(scratch), max_rss)
        proto.write("ready\n")
        for line in sys.stdin:
            result = run_case(env, line.strip())
            proto.write(json.dumps(result) + "\n")


class _Worker:
    def __init__(self, base: Path, seed: int, max_rss: int, errlog: Path) -> None:
        self.err = open(errlog, "ab")  # noqa: SIM115 - closed in close()
        self.errlog = errlog
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(base), "--seed", str(seed),
                                      "--max-rss-mib", str(max_rss >> 20)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.buf = b""
        if self.recv(300) != "ready":
            tail = self.tail()
            self.close(kill=True)
            raise RuntimeError(f"a fuzz worker failed to start:\n{tail}")

    def send(self, case: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(case.encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> str | None:
        """One line, or None if the worker died or stayed silent ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def tail(self) -> str:
        self.err.flush()
        return self.errlog.read_bytes()[-2000:].decode(errors="replace")

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.err.close()


def run_pool(
    base: Path, seed: int, max_rss: int, cases: list[str], workers: int, logdir: Path, progress: bool
) -> list[CaseResult]:
    todo: queue.Queue[str] = queue.Queue()
    for c in cases:
        todo.put(c)
    results: list[CaseResult] = []
    broken: list[str] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def drive(slot: int) -> None:
        try:
            run_worker(slot)
        except RuntimeError as e:  # a worker that cannot start: its cases stay unrun, and the run fails
            broken.append(str(e))

    def run_worker(slot: int) -> None:
        errlog = logdir / f"worker{slot}.log"
        w = _Worker(base, seed, max_rss, errlog)
        while True:
            try:
                case = todo.get_nowait()
            except queue.Empty:
                break
            w.send(case)
            line = w.recv(KILL_S)
            if line is None:
                dead = w.proc.poll() is not None
                how = f"died (exit {w.proc.returncode})" if dead else f"silent for {KILL_S:.0f} s"
                result = CaseResult(case=case, ckpt="?", kind="?", detail="", ops={}, verdict="FAILURE",
                                    why=[f"worker {how}: {w.tail()[-500:]}"], t_ops=KILL_S, py_peak=0, rss_peak=0, vm_hwm=0)
                w.close(kill=True)
                w = _Worker(base, seed, max_rss, errlog)
            else:
                result = json.loads(line)
            with lock:
                results.append(result)
                n = len(results)
            if progress and n % 1000 == 0:
                print(f"  {n}/{len(cases)} cases, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        w.close()

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if broken or len(results) != len(cases):
        raise RuntimeError(f"only {len(results)} of {len(cases)} cases ran:\n" + "\n".join(broken))
    return sorted(results, key=lambda r: (r["case"][0], int(r["case"][1:])))


# --- report -------------------------------------------------------------------------------------


@dataclass
class Summary:
    cases: int
    verdicts: dict[str, int]
    by_kind: dict[str, dict[str, int]]  # mutation kind -> verdict -> cases
    per_op: dict[str, dict[str, int]]  # operation -> outcome -> cases
    time_median_s: float
    time_p99_s: float
    time_max_s: float
    time_max_case: str
    py_peak_median: float
    py_peak_max: int
    py_peak_case: str
    rss_peak_median: float
    rss_peak_max: int
    rss_peak_case: str
    worker_vm_hwm_max: int
    failures: list[CaseResult]
    undetectable: list[CaseResult]
    special: list[CaseResult] = field(default_factory=list)


def summarize(results: list[CaseResult]) -> Summary:
    by_kind: dict[str, Counter[str]] = {}
    per_op: dict[str, Counter[str]] = {op: Counter() for op in OPS}
    for r in results:
        by_kind.setdefault(r["kind"], Counter())[r["verdict"]] += 1
        for op, out in r["ops"].items():
            per_op[op]["FAIL" if out.startswith("FAIL") else out] += 1
    times = sorted(r["t_ops"] for r in results)
    slowest = max(results, key=lambda r: r["t_ops"])
    py = max(results, key=lambda r: r["py_peak"])
    rss = max(results, key=lambda r: r["rss_peak"])
    return Summary(
        cases=len(results),
        verdicts=dict(Counter(r["verdict"] for r in results)),
        by_kind={k: dict(v) for k, v in sorted(by_kind.items())},
        per_op={op: dict(c.most_common()) for op, c in per_op.items()},
        time_median_s=statistics.median(times), time_p99_s=times[int(0.99 * (len(times) - 1))],
        time_max_s=slowest["t_ops"], time_max_case=slowest["case"],
        py_peak_median=statistics.median(r["py_peak"] for r in results), py_peak_max=py["py_peak"], py_peak_case=py["case"],
        rss_peak_median=statistics.median(r["rss_peak"] for r in results), rss_peak_max=rss["rss_peak"],
        rss_peak_case=rss["case"], worker_vm_hwm_max=max(r["vm_hwm"] for r in results),
        failures=[r for r in results if r["verdict"] == "FAILURE"],
        undetectable=[r for r in results if r["verdict"] == "undetectable"],
        special=[r for r in results if r["case"].startswith("s")],
    )


def print_report(s: Summary, seed: int, workers: int, wall: float) -> None:
    mib = 2**20
    print(f"cases: {s.cases} (seed {seed}, {workers} worker(s), {wall:.0f} s wall)")
    print("verdicts: " + ", ".join(f"{k} {s.verdicts.get(k, 0)}" for k in ("rejected", "harmless", "undetectable", "FAILURE")))
    print(f"{'mutation kind':<16} {'cases':>6} {'rejected':>9} {'harmless':>9} {'undetect.':>9} {'FAILURE':>8}")
    for kind, c in s.by_kind.items():
        print(f"{kind:<16} {sum(c.values()):>6} {c.get('rejected', 0):>9} {c.get('harmless', 0):>9} "
              f"{c.get('undetectable', 0):>9} {c.get('FAILURE', 0):>8}")
    for op, counts in s.per_op.items():
        print(f"{op}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    print(f"time per case (3 operations): median {1000 * s.time_median_s:.1f} ms, p99 {1000 * s.time_p99_s:.1f} ms, "
          f"max {1000 * s.time_max_s:.1f} ms ({s.time_max_case})")
    print(f"peak memory per case: Python allocations (tracemalloc) median {s.py_peak_median / mib:.1f} MiB, "
          f"max {s.py_peak_max / mib:.1f} MiB ({s.py_peak_case}); RSS above the case's start median "
          f"{s.rss_peak_median / mib:.1f} MiB, max {s.rss_peak_max / mib:.1f} MiB ({s.rss_peak_case}); "
          f"worker peak RSS (VmHWM) max {s.worker_vm_hwm_max / mib:.0f} MiB")
    if s.undetectable:
        kinds = Counter(r["kind"] for r in s.undetectable)
        print(f"undetectable by design ({len(s.undetectable)}; index.json has no checksum, forged blocks recompute "
              "theirs): " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    for r in s.failures[:30]:
        print(f"FAILURE {r['case']} [{r['kind']} on {r['ckpt']}] {r['detail']}")
        for w in r["why"]:
            print(f"    {w}")
        print(f"    replay: python3 benchmarks/fuzz.py --seed {seed} --case {r['case']} --keep /tmp/fuzz-case")
    if len(s.failures) > 30:
        print(f"... and {len(s.failures) - 30} more failures")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="random cases (the special-file cases come on top)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-special", action="store_true", help="skip the special-file cases")
    p.add_argument("--max-rss-mib", type=int, default=256, help="a case raising peak RSS by more fails")
    p.add_argument("--json", type=Path, help="write the summary and every failing case here")
    p.add_argument("--tmp", help="where the checkpoints and case copies go (default: /dev/shm when writable)")
    p.add_argument("--case", help="run one case (r<n> or s<n>) in this process, with tracebacks")
    p.add_argument("--keep", type=Path, help="with --case: leave the mutated checkpoint here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--build-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    max_rss = args.max_rss_mib << 20
    if args.build_rank is not None:
        _build_rank(args.build_rank, 2, args.init, args.out)
        return 0
    if args.worker is not None:
        worker_main(args.worker, args.seed, max_rss)
        return 0
    tmp_root = args.tmp or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)  # tmpfs: cheap copies
    with tempfile.TemporaryDirectory(prefix="shardckpt-fuzz-", dir=tmp_root) as tmp:
        base = Path(tmp) / "pristine"
        base.mkdir()
        say = (lambda m: print(m, file=sys.stderr)) if args.case else print
        say("checkpoints:")
        build_checkpoints(base, say)
        if args.case:
            signal.signal(signal.SIGALRM, _on_alarm)
            result = run_case(Env(base, args.seed, Path(tmp), max_rss), args.case, keep=args.keep, trace=True)
            print(json.dumps(result, indent=1))
            return 1 if result["verdict"] == "FAILURE" else 0
        cases = [f"r{i}" for i in range(args.cases)] + ([] if args.no_special else [f"s{i}" for i in range(len(SPECIAL))])
        t0 = time.monotonic()
        try:
            results = run_pool(base, args.seed, max_rss, cases, args.workers, Path(tmp), progress=True)
        except RuntimeError as e:
            print(f"fuzz: {e}", file=sys.stderr)
            return 2
        summary = summarize(results)
        print_report(summary, args.seed, args.workers, time.monotonic() - t0)
        if args.json:
            summary.undetectable = summary.undetectable[:200]
            args.json.write_text(json.dumps(asdict(summary), indent=1))
        return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
