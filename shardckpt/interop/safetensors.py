"""Export a checkpoint's tensors as Hugging Face safetensors: the layout ``save_pretrained`` writes.

One ``model.safetensors`` when everything fits in one shard, else ``model-00001-of-0000N.safetensors``
files plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map":
{name: file}}``). The safetensors format is written here directly, not through the ``safetensors``
package: it is an 8-byte little-endian header length, a JSON header (dtype, shape and
``data_offsets`` per tensor), then the raw little-endian bytes. Writing it ourselves is what lets
export stream: a header needs only the dtypes and shapes, which the index has, so each tensor is
read from the checkpoint in pieces of at most ``PIECE_BYTES``, cast, written and dropped. Memory
stays at one piece plus the blocks being decoded, however large the model or a tensor in it
(``safetensors.torch.save_file`` needs a whole shard in memory).

Names: the path of each tensor below ``key``, parts joined with ``.`` (``{"model": {"layers.0.weight":
...}}`` with ``key="model"`` gives ``layers.0.weight``), then ``prefix_strip`` removed.

Tied weights: a module saved as a module (``{"model": model}``) has its tied parameters stored once,
under the first name (docs/parallel_layouts.md), so they are exported once, as ``save_pretrained``
does (an LM head tied to the embedding is left to the model's config to re-tie). A state dict saved
as a plain dict holds both names as separate tensors; the index cannot tell a tie from two equal
tensors (every LayerNorm weight starts as ones), so both are exported unless ``tied`` names the
pair, and then the pair is checked to hold the same bytes before one is dropped.

Not exported: values (safetensors holds tensors only), and per-rank tensors (saved inside
``PerRank``), which have no single value; both are counted in the result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from shardckpt.api import CheckpointReader, PathLike
from shardckpt.dist import Comm
from shardckpt.errors import CheckpointError, CheckpointIOError, ExportError
from shardckpt.format.schema import TensorEntry
from shardckpt.interop.safetensors_format import (
    INDEX_NAME,
    METADATA_KEY,
    SAFETENSORS_DTYPES,
    WEIGHTS_NAME,
    le_bytes,
)
from shardckpt.planning.boxes import Box, split_box

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
# A tensor is read, cast and written in row-major pieces of at most this many (source) bytes.
PIECE_BYTES = 64 << 20
_SHARD_NAME = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors")

CAST_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


@dataclass(frozen=True)
class ExportedTensor:
    name: str  # in the safetensors file
    entry: TensorEntry  # where it comes from in the checkpoint
    dtype: torch.dtype  # as written

    @property
    def nbytes(self) -> int:
        return math.prod(self.entry.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ExportPlan:
    """Which tensor goes into which file, decided from the index alone."""

    shards: tuple[tuple[ExportedTensor, ...], ...]
    files: tuple[str, ...]
    skipped_per_rank: tuple[str, ...] = ()  # checkpoint keys
    skipped_values: int = 0
    # (left out, the tensor it is tied to): checked to be equal before anything is written
    ties: tuple[tuple[ExportedTensor, ExportedTensor], ...] = ()

    @property
    def tied(self) -> dict[str, str]:
        return {dropped.name: kept.name for dropped, kept in self.ties}

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for shard in self.shards for t in shard)


@dataclass(frozen=True)
class ExportResult:
    out: str
    files: tuple[str, ...]
    tensors: int
    total_size: int
    skipped_per_rank: tuple[str, ...]
    skipped_values: int
    tied: Mapping[str, str]


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (decimal units, as ``save_pretrained``
    reads them), ``"500MiB"`` (binary) or ``"1000000"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ExportError(f"max shard size {size!r} is not a size; write it like 5GB, 500MB, 2GiB or 1000000 (bytes)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ExportError(f"max shard size {size!r} must be positive")
    return n


def plan_export(
    reader: CheckpointReader,
    *,
    key: str | None = None,
    prefix_strip: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tied: Mapping[str, str] | None = None,
) -> ExportPlan:
    """The export of ``reader``'s checkpoint, without reading any tensor data. Raises
    ``ExportError`` (or ``MissingKeysError`` for an unknown ``key``) before anything is written."""
    where = reader.where
    limit = parse_size(max_shard_size)
    cast = _cast_dtype(dtype)
    tensors, values = reader.select(None if key is None else [key])
    skipped = tuple(t.key for t in tensors if t.rank is not None)
    named: dict[str, ExportedTensor] = {}
    for entry in (t for t in tensors if t.rank is None):
        name = _name_below(entry, key)
        if entry.torch_dtype not in SAFETENSORS_DTYPES:
            raise ExportError(f"{where}: tensor {entry.key!r} has dtype {entry.dtype}, which safetensors cannot hold; "
                              "select other keys with key=/--key")
        out_dtype = cast if cast is not None and entry.torch_dtype.is_floating_point else entry.torch_dtype
        if name in named:
            raise ExportError(f"{where}: tensors {named[name].entry.key!r} and {entry.key!r} are both named {name!r} "
                              "in the export; select one subtree with key=/--key")
        named[name] = ExportedTensor(name, entry, out_dtype)
    if not named:
        raise ExportError(f"{where}: nothing to export under {key or 'the checkpoint'!r}: it holds no tensors "
                          f"(only values, or per-rank tensors: {len(skipped)})")
    if prefix_strip:
        if not any(n.startswith(prefix_strip) for n in named):
            raise ExportError(f"{where}: prefix_strip {prefix_strip!r} begins no tensor name (names look like "
                              f"{next(iter(named))!r})")
        stripped: dict[str, ExportedTensor] = {}
        for name, t in named.items():
            new = name[len(prefix_strip):] if name.startswith(prefix_strip) else name
            if not new or new in stripped:
                raise ExportError(f"{where}: stripping {prefix_strip!r} from {name!r} leaves "
                                  f"{'an empty name' if not new else 'a name another tensor has'}")
            stripped[new] = ExportedTensor(new, t.entry, t.dtype)
        named = stripped
    for name, t in named.items():
        # The header's "__metadata__" member is not a tensor, and readers (this one included)
        # refuse a tensor without a name: either would write a file nobody can read back.
        if name in ("", METADATA_KEY):
            raise ExportError(f"{where}: tensor {t.entry.key!r} would be named {name!r} in the export, which "
                              "safetensors reserves or cannot read back; select it with another key=/--key, or "
                              "export a subtree that names it")
    for later, first in (tied or {}).items():
        a, b = named.get(later), named.get(first)
        if a is None or b is None or later == first:
            raise ExportError(f"{where}: tie {later!r} -> {first!r}: both must be distinct exported tensor names")
        if (a.entry.dtype, a.entry.shape) != (b.entry.dtype, b.entry.shape):
            raise ExportError(f"{where}: tie {later!r} -> {first!r}: they differ in dtype or shape "
                              f"({a.entry.dtype}{list(a.entry.shape)} vs {b.entry.dtype}{list(b.entry.shape)})")
    ties = tuple((named[later], named[first]) for later, first in (tied or {}).items())
    if any(kept.name in (tied or {}) for _, kept in ties):
        raise ExportError(f"{where}: ties {dict(tied or {})} chain; tie every name to the one that is kept")
    kept = [t for name, t in named.items() if name not in (tied or {})]
    shards = _split(kept, limit)
    if len(shards) == 1:
        files: tuple[str, ...] = (WEIGHTS_NAME,)
    else:
        files = tuple(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards)))
    return ExportPlan(tuple(shards), files, skipped, len(values), ties)


def export_safetensors(
    checkpoint: PathLike,
    out: PathLike,
    *,
    key: str | None = None,
    prefix_strip: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tied: Mapping[str, str] | None = None,
    overwrite: bool = False,
    process_group: dist.ProcessGroup | None = None,
    on_bytes: Callable[[int], object] | None = None,
) -> ExportResult:
    """Write the tensors of ``checkpoint`` (under ``key``) as safetensors into the directory ``out``.

    - ``key``: the subtree to export (``"model"``); names are the paths below it joined with ``.``.
    - ``prefix_strip``: removed from the start of every name that has it (``"_orig_mod."``).
    - ``dtype``: ``"bf16"``, ``"fp16"`` or ``"fp32"``: floating-point tensors are cast to it, others
      kept (as ``save_pretrained(torch_dtype=...)`` does).
    - ``max_shard_size``: bytes per file (``"5GB"``); a tensor larger than that gets a file of its own.
    - ``tied``: exported name -> the name it is tied to; the first is left out once the two are seen
      to hold the same bytes (see the module docstring for which ties are found without it).
    - ``overwrite``: ``out`` may already hold an export (``model*.safetensors`` or the index); the
      new files replace it, and files of the old one that the new one lacks are removed. Other
      files in ``out`` (``config.json``, a tokenizer) are left alone in any case.
    - ``process_group``: a distributed export: collective; each rank writes every world_size-th
      file and rank 0 the index, after all files are written.
    - ``on_bytes(n)``: called as each piece of ``n`` tensor bytes is written (the CLI's progress bar).

    Each file is written under a temporary name and renamed into place; the index comes last.
    Reads one piece of one tensor at a time (see the module docstring).

    Example::

        shardckpt.export_safetensors("ckpt/step-100", "hf_out", key="model", dtype="bf16")
        model = AutoModelForCausalLM.from_pretrained("hf_out")  # once config.json is there too
    """
    comm = Comm.for_group(process_group)
    what = f"export of {checkpoint} to {out}"
    readers: list[CheckpointReader] = []

    def prepare() -> tuple[tuple[Path, CheckpointReader, ExportPlan], object]:
        # Everything that can refuse the export, on every rank, before any rank writes: a rank
        # checking OUT while another already writes there would see an export and refuse.
        target = _check_destination(checkpoint, out, overwrite)
        reader = CheckpointReader(checkpoint)
        readers.append(reader)
        plan = plan_export(reader, key=key, prefix_strip=prefix_strip, dtype=dtype,
                           max_shard_size=max_shard_size, tied=tied)
        reader.check(t.entry for i in _mine(plan, comm) for t in plan.shards[i])
        if comm.is_coordinator:
            for dropped, kept in plan.ties:
                _check_tie(reader, dropped, kept)
        return (target, reader, plan), None

    try:
        (target, reader, plan), _ = comm.run(f"{what}: planning", prepare)

        def write() -> tuple[None, object]:
            target.mkdir(parents=True, exist_ok=True)
            for i in _mine(plan, comm):
                _write_file(reader, plan.shards[i], target / plan.files[i], on_bytes)
            return None, None

        comm.run(what, write)
    finally:
        for r in readers:
            r.close()

    def finish() -> tuple[None, object]:
        if comm.is_coordinator:
            if len(plan.files) > 1:
                weight_map = {t.name: plan.files[i] for i, shard in enumerate(plan.shards) for t in shard}
                doc = {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(weight_map.items()))}
                _write_atomically(target / INDEX_NAME, json.dumps(doc, indent=2).encode() + b"\n")
            _remove_stale(target, set(plan.files) | ({INDEX_NAME} if len(plan.files) > 1 else set()))
        return None, None

    comm.run(f"{what}: index", finish)
    result = ExportResult(str(out), plan.files, sum(len(s) for s in plan.shards), plan.total_size,
                          plan.skipped_per_rank, plan.skipped_values, plan.tied)
    if comm.is_coordinator:
        log.info("exported %s -> %s: %d tensors, %d bytes in %d file(s)", checkpoint, out, result.tensors,
                 result.total_size, len(result.files))
    return result


def _mine(plan: ExportPlan, comm: Comm) -> list[int]:
    """The files this rank writes: every world_size-th, so ranks share the work evenly."""
    return [i for i in range(len(plan.files)) if i % comm.world_size == comm.rank]


def _cast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in CAST_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in CAST_DTYPES:
        return CAST_DTYPES[dtype.lower()]
    raise ExportError(f"export dtype {dtype!r} is not one of bf16, fp16, fp32")


def _name_below(entry: TensorEntry, key: str | None) -> str:
    parts = [str(p) for p in entry.path]
    if key is not None:
        depth = next((n for n in range(len(parts) + 1) if "/".join(parts[:n]) == key), None)
        if depth is None:  # the key ends inside a path part that holds "/"
            raise ExportError(f"key {key!r} splits the path part of tensor {entry.key!r}; select whole path parts")
        parts = parts[depth:] or parts[-1:]  # the key names the tensor itself: its own last part
    return ".".join(parts)


def _split(tensors: list[ExportedTensor], limit: int) -> list[tuple[ExportedTensor, ...]]:
    """Greedy, in checkpoint order, as ``save_pretrained`` shards: a file takes tensors until the
    next would pass ``limit``; a tensor larger than ``limit`` alone makes a file."""
    shards: list[list[ExportedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [tuple(s) for s in shards]


def _check_destination(checkpoint: PathLike, out: PathLike, overwrite: bool) -> Path:
    text = os.fspath(out)
    if "://" in text:
        raise ExportError(f"export: {text} is a URL; export writes to a local directory (copy it up afterwards)")
    target = Path(text)
    if target.exists() and not target.is_dir():
        raise ExportError(f"export: {target} exists and is not a directory")
    src = os.fspath(checkpoint)
    if "://" not in src:
        s, d = Path(src).resolve(), target.resolve()
        if d == s or s in d.parents:
            raise ExportError(f"export: destination {target} is, or is inside, the checkpoint {src}; choose another directory")
    if target.is_dir() and not overwrite:
        existing = sorted(p.name for p in target.iterdir() if _is_export_file(p.name))
        if existing:
            raise ExportError(f"export: {target} already holds an export ({', '.join(existing[:3])}); "
                              "pass overwrite=True (--overwrite) to replace it, or choose another directory")
    return target


def _is_export_file(name: str) -> bool:
    return name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_NAME.fullmatch(name) is not None


def _remove_stale(target: Path, keep: set[str]) -> None:
    """Files of an earlier export that this one replaced (other shard counts), so that no loader
    meets a mix of the two."""
    for p in target.iterdir():
        if _is_export_file(p.name) and p.name not in keep:
            try:
                p.unlink()
            except OSError as e:
                raise CheckpointIOError(f"export: cannot remove {p}, left from an earlier export: {e}") from e


def _header(shard: tuple[ExportedTensor, ...]) -> tuple[bytes, list[ExportedTensor]]:
    # Largest itemsize first, so every tensor's data starts aligned to its element size (the order
    # the safetensors package writes in too); the header is padded with spaces to 8 bytes.
    order = sorted(shard, key=lambda t: -t.dtype.itemsize)
    header: dict[str, object] = {METADATA_KEY: {"format": "pt"}}
    offset = 0
    for t in order:
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.entry.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def _write_file(reader: CheckpointReader, shard: tuple[ExportedTensor, ...], path: Path,
                on_bytes: Callable[[int], object] | None = None) -> None:
    header, order = _header(shard)
    expected = len(header) + sum(t.nbytes for t in order)

    def fill(f: _Sink) -> None:
        f.write(header)
        for t in order:
            for piece in split_box(Box.full(t.entry.shape), t.entry.torch_dtype.itemsize, PIECE_BYTES):
                data = le_bytes(reader.read(t.entry, piece.box).to(t.dtype))
                f.write(data)
                if on_bytes is not None:
                    on_bytes(len(data))
        if f.written != expected:  # a bug, never the input: the header would lie about the data
            raise CheckpointError(f"export: {path}: wrote {f.written} bytes, the header describes {expected}")

    _write_atomically(path, fill)


def _check_tie(reader: CheckpointReader, dropped: ExportedTensor, kept: ExportedTensor) -> None:
    a, b = dropped.entry, kept.entry
    for piece in split_box(Box.full(a.shape), a.torch_dtype.itemsize, PIECE_BYTES):
        x, y = reader.read(a, piece.box), reader.read(b, piece.box)
        # Compared as bytes: NaNs (and -0.0 against 0.0) decide as the file would.
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            raise ExportError(f"{reader.where}: tie {dropped.name!r} -> {kept.name!r}: the tensors {a.key!r} and "
                              f"{b.key!r} hold different values, so they are not one tied weight; drop the tie")


class _Sink:
    def __init__(self, f: object) -> None:
        self.f = f
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)  # type: ignore[attr-defined]
        self.written += len(data)


def _write_atomically(path: Path, content: bytes | Callable[[_Sink], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            if isinstance(content, bytes):
                sink.write(content)
            else:
                content(sink)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointIOError(f"export: writing {path} failed: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
