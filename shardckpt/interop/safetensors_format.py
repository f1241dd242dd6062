"""The safetensors file format, as export writes it and import reads it: the validation of files
shardckpt did not write, and ``SafetensorsSource``, which finds a model's files (one file, or a
sharded directory) and reads their headers.

A file is an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON (padded with
spaces), then the data: each tensor's raw little-endian bytes, row-major. The header maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data,
which starts at ``8 + N``), plus an optional ``"__metadata__"`` map of strings to strings. A
sharded model is several such files and ``model.safetensors.index.json``:
``{"metadata": {...}, "weight_map": {name: file}}``.

Everything read from a file is untrusted: a header is at most ``MAX_HEADER_BYTES`` (the
safetensors package's own limit) and no longer than the file; it must be one JSON object without
duplicate keys; every tensor has a known dtype, a shape of non-negative ints whose byte size is its
``data_offsets`` span, and a span inside the file that overlaps no other tensor's. Nothing is
allocated from a size before that holds. A weight map may only name plain relative file names
inside the model's directory (no ``..``, no absolute path). Failures are
``CorruptCheckpointError`` (a data file) and ``IndexFormatError`` (the weight map), naming the file
and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import torch

from shardckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, IndexFormatError
from shardckpt.format.index_json import no_duplicate_keys
from shardckpt.storage import Storage, open_storage, parse_location
from shardckpt.storage.s3 import S3Options

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# The safetensors package refuses headers over 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
MAX_INDEX_BYTES = 100_000_000
_MAX_NDIM = 64
_MAX_ELEMENTS = 1 << 62  # beyond any real tensor; keeps shape arithmetic away from torch's int64 limits

# What export writes (torch dtype -> safetensors name).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# What import reads: the above and the other names the safetensors package maps to torch.
READ_DTYPES: dict[str, torch.dtype] = {
    **{name: dtype for dtype, name in SAFETENSORS_DTYPES.items()},
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
}

METADATA_KEY = "__metadata__"  # the header's one member that is not a tensor


PathLike = str | os.PathLike[str]
Run = tuple[int, int]  # (first byte in the file, length)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; ``start`` is its first byte in the file (header included)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass(frozen=True)
class FileHeader:
    """A validated header: the file's size, where its data starts, its tensors and metadata."""

    where: str
    size: int
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(storage: Storage, name: str, where: str) -> FileHeader:
    """The validated header of the safetensors file ``name`` in ``storage`` (``where`` names it in
    errors). Reads the 8-byte length, checks it against the limit and the file size, then reads and
    validates the header; no tensor data is read."""
    size = storage.size(name)
    if size < 8:
        raise CorruptCheckpointError(f"{where}: {size} bytes is too short for a safetensors file (8-byte header "
                                     "length, then the header)")
    n = int.from_bytes(storage.read_range(name, 0, 8), "little")
    if n > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"{where}: header length {n} is over the {MAX_HEADER_BYTES}-byte limit; "
                                     "not a safetensors file, or a hostile one")
    if n < 2 or 8 + n > size:
        raise CorruptCheckpointError(f"{where}: header length {n} does not fit the file ({size} bytes); "
                                     "truncated or not a safetensors file")
    return parse_header(storage.read_range(name, 8, n), size, where)


def parse_header(raw: bytes, size: int, where: str) -> FileHeader:
    """Validate the JSON header ``raw`` of a file of ``size`` bytes (see the module docstring)."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where}: the header is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: the header is a JSON {type(doc).__name__}, not an object")
    data_start = 8 + len(raw)
    data_len = size - data_start
    metadata = doc.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{where}: {METADATA_KEY} must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, spec in doc.items():
        if not name:
            raise CorruptCheckpointError(f"{where}: a tensor has an empty name")
        dtype, shape, begin, end = _entry(spec, f"{where}: tensor {name!r}")
        itemsize = dtype.itemsize
        if math.prod(shape) * itemsize != end - begin:
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} is {_dtype_name(dtype)}{list(shape)}, {math.prod(shape) * itemsize} bytes, "
                f"but its data_offsets [{begin}, {end}] hold {end - begin}")
        if end > data_len:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} ends at data byte {end}, past the end of the file "
                                         f"({data_len} data bytes): truncated or hostile")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, end - begin)
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, a_end, a), (b_begin, _, b) in zip(spans, spans[1:]):
        if b_begin < a_end:
            raise CorruptCheckpointError(f"{where}: tensors {a!r} and {b!r} overlap in the file (data_offsets); "
                                         "each tensor must have bytes of its own")
    return FileHeader(where, size, data_start, tensors, dict(metadata))


def _entry(spec: object, what: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(spec, dict):
        raise CorruptCheckpointError(f"{what}: its header entry is not an object")
    dtype_name, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in READ_DTYPES:
        raise CorruptCheckpointError(f"{what}: unknown dtype {dtype_name!r} (known: {', '.join(sorted(READ_DTYPES))})")
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise CorruptCheckpointError(f"{what}: shape {shape!r} is not a list of at most {_MAX_NDIM} non-negative ints")
    if math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS:
        raise CorruptCheckpointError(f"{what}: shape {shape!r} is too large for any tensor")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CorruptCheckpointError(f"{what}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    return READ_DTYPES[dtype_name], tuple(shape), offsets[0], offsets[1]


def parse_weight_map(raw: bytes, where: str) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json`` (``raw``, at most
    ``MAX_INDEX_BYTES``): tensor name -> file name, each file a plain relative path."""
    if len(raw) > MAX_INDEX_BYTES:
        raise IndexFormatError(f"{where}: over the {MAX_INDEX_BYTES}-byte limit for a weight map")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexFormatError(f"{where}: not valid JSON: {e}") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise IndexFormatError(f"{where}: no \"weight_map\" object mapping tensor names to files")
    for name, file in weight_map.items():
        if not name or not isinstance(file, str):
            raise IndexFormatError(f"{where}: weight_map entry {name!r}: {file!r} is not a tensor name and a file name")
        parts = file.split("/")
        if (file.startswith("/") or "\\" in file or "\0" in file or ":" in parts[0]
                or any(p in ("", ".", "..") for p in parts)):
            raise IndexFormatError(f"{where}: tensor {name!r} is mapped to {file!r}, which is not a plain file name "
                                   "inside the model's directory")
    return dict(weight_map)


class SafetensorsSource:
    """An opened safetensors model: which file holds each tensor, and the files' validated
    headers (read on first use). ``names`` maps each tensor name to its file."""

    def __init__(self, path: PathLike, *, s3: S3Options | None = None) -> None:
        self.where = os.fspath(path)
        self._s3 = s3
        self._storages: dict[str, Storage] = {}
        self._headers: dict[str, FileHeader] = {}
        self._objects: dict[str, tuple[Storage, str]] = {}
        try:
            self._base, single, index = self._locate(path)
            if index is not None:
                self.index_name: str | None = index
                storage, obj = self._object(index)
                where = f"{self._base}/{index}"
                self.names: dict[str, str] = parse_weight_map(storage.read_all(obj, MAX_INDEX_BYTES), where)
            else:
                assert single is not None
                self.index_name = None
                self.names = {name: single for name in self.header(single).tensors}
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _locate(self, path: PathLike) -> tuple[str, str | None, str | None]:
        """(the model's directory, its single file or None, its index or None)."""
        loc = parse_location(path)
        if loc.path is not None:
            p = loc.path.absolute()  # a relative "run:1/x" must not read as a URL when reparsed below
            if p.is_dir():
                base, leaf = str(p), None
            elif p.exists():
                base, leaf = str(p.parent), p.name
            else:
                raise CheckpointNotFoundError(f"{p}: no such file or directory")
        else:
            url = loc.url
            if url.endswith((".safetensors", ".json")):
                base, _, leaf = url.rpartition("/")
            else:
                base, leaf = url, None
        if leaf is not None:
            return (base, None, leaf) if leaf.endswith(".json") else (base, leaf, None)
        for name in (INDEX_NAME, WEIGHTS_NAME):
            storage, obj = self._object(name, base)
            if storage.exists(obj):
                return (base, None, name) if name == INDEX_NAME else (base, name, None)
        ours, ours_name = self._object("index.json", base)
        hint = "; it holds a shardckpt checkpoint (index.json): use shardckpt.load" if ours.exists(ours_name) else ""
        raise CheckpointNotFoundError(f"{base}: neither {INDEX_NAME} nor {WEIGHTS_NAME} is there; pass the "
                                      f".safetensors file itself if it has another name{hint}")

    def _object(self, name: str, base: str | None = None) -> tuple[Storage, str]:
        """The storage holding the file ``name`` of the model and its name there. A local file is
        resolved first: a link (the Hugging Face cache's snapshot files) is followed to its blob."""
        base = self._base if base is None else base
        key = f"{base}\0{name}"
        found = self._objects.get(key)
        if found is None:
            loc = parse_location(base)
            if loc.path is not None:
                real = (loc.path / name).resolve()
                where, obj = str(real.parent), real.name
            else:
                where, obj = base, name
            storage = self._storages.get(where)
            if storage is None:
                storage = self._storages[where] = open_storage(where, s3=self._s3)
            found = self._objects[key] = (storage, obj)
        return found

    def header(self, file: str) -> FileHeader:
        """The validated header of ``file`` (a name in the weight map, or the single file)."""
        header = self._headers.get(file)
        if header is None:
            storage, obj = self._object(file)
            header = self._headers[file] = read_header(storage, obj, f"{self._base}/{file}")
        return header

    def info(self, name: str) -> tuple[str, TensorInfo]:
        """(file, tensor) for ``name``; the weight map's word is checked against the file's header."""
        file = self.names[name]
        info = self.header(file).tensors.get(name)
        if info is None:
            raise IndexFormatError(f"{self._base}/{self.index_name}: maps tensor {name!r} to {file}, whose header "
                                   "does not hold it")
        return file, info

    def read_runs(self, file: str, runs: list[Run], into: memoryview) -> None:
        """Fill ``into`` with the byte ``runs`` of ``file``, one after another."""
        storage, obj = self._object(file)
        pos = 0
        for start, n in runs:
            storage.read_into(obj, start, into[pos:pos + n])
            pos += n

    def close(self) -> None:
        for storage in self._storages.values():
            storage.close()


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _dtype_name(dtype: torch.dtype) -> str:
    return next((n for n, d in READ_DTYPES.items() if d == dtype), str(dtype))


def le_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` (on the CPU), little-endian, row-major: what a safetensors file holds."""
    flat = t.contiguous().reshape(-1)
    if sys.byteorder == "big" and t.dtype.itemsize > 1:
        return flat.view(_SAME_SIZE_INT[t.dtype.itemsize]).numpy().byteswap().view("u1").data
    return flat.view(torch.uint8).numpy().data


def from_le(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The uint8 tensor ``buf`` of little-endian bytes read as ``dtype`` (flat, sharing memory
    where the host is little-endian)."""
    unit = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize  # complex: two floats, each swapped
    if sys.byteorder == "big" and unit > 1:
        buf = torch.from_numpy(buf.numpy().view(f"<i{unit}").astype(f">i{unit}").view("u1"))
    return buf.view(dtype)


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
