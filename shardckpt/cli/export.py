"""``export``: a checkpoint's tensors as Hugging Face safetensors, streamed (docs/interop.md)."""

from __future__ import annotations

import argparse
import math

from shardckpt.catalog import read_index
from shardckpt.cli.output import emit_json, mb, progress
from shardckpt.errors import CheckpointError, ExportError


def cmd_export(args: argparse.Namespace) -> int:
    """Write CKPT's tensors (under --key) into OUT as safetensors shards plus their index."""
    from shardckpt.interop.safetensors import export_safetensors  # imports torch

    tied: dict[str, str] = {}
    for pair in args.tie or []:
        later, sep, first = pair.partition("=")
        if not sep or not later or not first:
            raise ExportError(f"--tie {pair!r}: write it as LATER=FIRST (lm_head.weight=model.embed_tokens.weight)")
        tied[later] = first
    bar = progress(args, _bytes_to_write(args), f"export {args.ckpt}")
    try:
        r = export_safetensors(args.ckpt, args.out, key=args.key, prefix_strip=args.prefix_strip, dtype=args.dtype,
                               max_shard_size=args.max_shard_size, tied=tied, overwrite=args.overwrite,
                               on_bytes=bar.update)
    finally:
        bar.close()
    if args.json:
        emit_json({"out": r.out, "files": list(r.files), "tensors": r.tensors, "total_size": r.total_size,
                   "skipped_per_rank": list(r.skipped_per_rank), "skipped_values": r.skipped_values,
                   "tied": dict(r.tied)})
        return 0
    print(f"{args.ckpt} -> {args.out}: {r.tensors} tensors, {mb(r.total_size)} in {len(r.files)} file(s)"
          + (f", tied {dict(r.tied)} written once" if r.tied else ""))
    if r.skipped_per_rank or r.skipped_values:
        print(f"  not exported: {r.skipped_values} value(s) and {len(r.skipped_per_rank)} per-rank tensor(s) "
              "(safetensors holds one tensor per name)")
    return 0


_FLOATS = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
_CAST_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def _bytes_to_write(args: argparse.Namespace) -> int | None:
    """The progress bar's total: the bytes of the global tensors under --key after the cast (a tie
    written once makes the export end short of it). None when the index cannot be read: the
    export itself then reports why."""
    try:
        index = read_index(args.ckpt)
    except CheckpointError:
        return None
    total = 0
    for t in index.tensors:
        if t.rank is None and (args.key is None or t.key == args.key or t.key.startswith(args.key + "/")):
            size = _CAST_SIZE[args.dtype] if args.dtype and t.dtype in _FLOATS else t.itemsize
            total += size * math.prod(t.shape)
    return total
