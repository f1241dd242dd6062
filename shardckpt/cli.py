"""The ``shardckpt`` command: look at, check and rewrite checkpoints, over the public API only.

    shardckpt ls ROOT                 committed steps under a CheckpointManager root
    shardckpt inspect PATH            tensors, values, files, sizes and codecs of one checkpoint
                                      (--json: values in their stored typed-JSON form, docs/format.md)
    shardckpt verify PATH [PATH ...]  re-read every block against its checksum (exit 1 on failure,
                                      3 when all pass but some hold orphaned files of a torn save)
    shardckpt convert SRC DST [--compression zstd|none] [--from shardckpt|dcp|torch] [--overwrite]
                                      rewrite as shardckpt (gathered in one process)
    shardckpt export CKPT OUT --format safetensors [--key model] [--prefix-strip P] [--dtype bf16|fp16|fp32]
                     [--max-shard-size 5GB] [--tie LATER=FIRST ...] [--overwrite] [--json]
                                      write Hugging Face safetensors shards (+ model.safetensors.index.json),
                                      streamed one tensor piece at a time (docs/interop.md)

ls, inspect and verify only read: they never write or delete anything.

Exit codes: 0 success; 1 verify found a bad checkpoint (or ls an unreadable step); 2 any other
error, printed as one line naming its CheckpointError class (a missing checkpoint, an unknown
--key, an OUT that already holds an export without --overwrite, a bad --max-shard-size), and
also a usage error from argparse; 3 verify passed but found orphaned files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from shardckpt.api import load, read_index, save, verify
from shardckpt.errors import CheckpointError, CorruptCheckpointError
from shardckpt.format.values import decode_value
from shardckpt.manager import committed_steps
from shardckpt.pipeline.reader import check_files
from shardckpt.storage import open_storage, parse_location


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_ls(args: argparse.Namespace) -> int:
    steps = committed_steps(args.root)
    if not steps:
        print(f"{args.root}: no committed checkpoints")
        return 0
    failed = 0
    for step in steps:
        try:
            index = read_index(parse_location(args.root).join(f"step-{step:08d}"))
        except CheckpointError as e:
            print(f"step {step:>10}  unreadable: {type(e).__name__}: {e}")
            failed += 1
            continue
        print(f"step {step:>10}  {index.world_size:>4} ranks  {len(index.tensors):>6} tensors  "
              f"{_mb(index.bytes_stored()):>12} stored  ({_mb(index.bytes_raw())} raw)")
    return 1 if failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    index = read_index(args.path)
    codecs = Counter(b.codec for t in index.tensors for b in t.blocks)
    summary = {
        "path": args.path,
        "format_version": index.version,
        "save_id": index.save_id,
        "world_size": index.world_size,
        "files": [{"name": f.name, "rank": f.rank, "bytes": f.size} for f in index.files],
        "bytes_raw": index.bytes_raw(),
        "bytes_stored": index.bytes_stored(),
        "blocks_by_codec": dict(codecs),
        "metadata": index.metadata,
    }
    if args.json:
        summary["tensors"] = [{"key": t.key, "dtype": t.dtype, "shape": list(t.shape), "rank": t.rank,
                               "blocks": len(t.blocks)} for t in index.tensors]
        # Values in their stored typed-JSON form (docs/format.md, "Values"): decoded, a dict with
        # both 0 and "0" as keys would print two "0" members, and a tuple key could not print at all.
        summary["values"] = {v.key if v.rank is None else f"{v.key}@{v.rank}": v.value for v in index.values}
        print(json.dumps(summary, indent=1, default=repr))
        return 0
    ratio = index.bytes_raw() / index.bytes_stored() if index.bytes_stored() else 1.0
    print(f"{args.path}: format v{index.version}, save {index.save_id}, {index.world_size} ranks, "
          f"{_mb(index.bytes_raw())} raw -> {_mb(index.bytes_stored())} stored ({ratio:.2f}x), "
          f"blocks {dict(codecs)}")
    for t in index.tensors[: args.limit]:
        who = "" if t.rank is None else f"  (rank {t.rank})"
        print(f"  tensor {t.key:<50} {t.dtype:<9} {list(t.shape)}  {len(t.blocks)} blocks{who}")
    for v in index.values[: args.limit]:
        who = "" if v.rank is None else f"  (rank {v.rank})"
        print(f"  value  {v.key:<50} {decode_value(v.value, args.path)!r:.60}{who}")
    hidden = len(index.tensors) + len(index.values) - min(args.limit, len(index.tensors)) - min(args.limit, len(index.values))
    if hidden > 0:
        print(f"  ... {hidden} more (--limit, or --json for all)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    failed = warned = 0
    for path in args.paths:
        try:
            r = verify(path)
        except CheckpointError as e:
            print(f"FAIL {path}: {type(e).__name__}: {e}")
            failed += 1
            continue
        print(f"ok   {path}: {r.files} files, {r.tensors} tensors, {r.blocks} blocks, {_mb(r.bytes_stored)} verified")
        if r.orphans:
            warned += 1
            print(f"warn {path}: {len(r.orphans)} data file(s) not named by the index, left by an interrupted save "
                  f"(harmless; the next save into this directory removes them): {', '.join(r.orphans)}")
    return 1 if failed else (3 if warned else 0)


def cmd_convert(args: argparse.Namespace) -> int:
    """Gather a (possibly sharded) checkpoint into one process and write it again as shardckpt:
    from shardckpt (to change compression), from DCP, or from a torch.save file."""
    _check_destination(Path(args.src), Path(args.dst), args.overwrite)
    if args.source_format != "shardckpt":
        # The only pickle readers, imported only for a migration that asks for them.
        if args.source_format == "dcp":
            from shardckpt.interop.dcp import read_dcp

            foreign = read_dcp(args.src)
        else:
            from shardckpt.interop.torch_save import read_torch_save

            foreign = read_torch_save(args.src)
        result = save(foreign, args.dst, compression=args.compression)
        print(f"{args.src} ({args.source_format}) -> {args.dst}: {_mb(result.bytes_raw)} raw, "
              f"{_mb(result.bytes_stored)} stored")
        return 0
    index = read_index(args.src)
    # The tensors below are allocated from the index's shapes, which validation bounds by the
    # declared data file sizes: check that the files really are that large before allocating.
    storage = open_storage(args.src)
    try:
        check_files(storage, index, set(range(len(index.files))), args.src)
    finally:
        storage.close()
    state: dict[str, object] = {}
    for t in index.tensors:
        if t.rank is not None:
            raise CheckpointError(f"{args.src}: tensor {t.key!r} is per-rank; convert keeps only global state")
        _put(state, t.path, torch.empty(t.shape, dtype=t.torch_dtype))
    for v in index.values:
        if v.rank is None:
            _put(state, v.path, None)
    load(state, args.src)
    result = save(state, args.dst, compression=args.compression, metadata=index.metadata)
    print(f"{args.src} -> {args.dst}: {_mb(result.bytes_raw)} raw, {_mb(result.bytes_stored)} stored")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from shardckpt.errors import ExportError
    from shardckpt.interop.safetensors import export_safetensors

    tied: dict[str, str] = {}
    for pair in args.tie or []:
        later, sep, first = pair.partition("=")
        if not sep or not later or not first:
            raise ExportError(f"--tie {pair!r}: write it as LATER=FIRST (lm_head.weight=model.embed_tokens.weight)")
        tied[later] = first
    r = export_safetensors(args.ckpt, args.out, key=args.key, prefix_strip=args.prefix_strip, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, tied=tied, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"out": r.out, "files": list(r.files), "tensors": r.tensors, "total_size": r.total_size,
                          "skipped_per_rank": list(r.skipped_per_rank), "skipped_values": r.skipped_values,
                          "tied": dict(r.tied)}, indent=1))
        return 0
    print(f"{args.ckpt} -> {args.out}: {r.tensors} tensors, {_mb(r.total_size)} in {len(r.files)} file(s)"
          + (f", tied {dict(r.tied)} written once" if r.tied else ""))
    if r.skipped_per_rank or r.skipped_values:
        print(f"  not exported: {r.skipped_values} value(s) and {len(r.skipped_per_rank)} per-rank tensor(s) "
              "(safetensors holds one tensor per name)")
    return 0


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """convert never writes into its source, and replaces a checkpoint only when asked to."""
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise CheckpointError(f"convert: destination {dst} is, or is inside, the source {src}; choose another directory")
    if (dst / "index.json").exists() and not overwrite:
        raise CheckpointError(f"convert: {dst} already holds a checkpoint; pass --overwrite to replace it")


def _put(root: dict[str, object], path: tuple[str | int, ...], value: object) -> None:
    node = root
    for i, part in enumerate(path):
        last = i + 1 == len(path)
        if not isinstance(node, dict) or (part in node and isinstance(node[part], dict) == last):
            # Two entries where one's path is a prefix of the other's ("a" and "a/b"): no state
            # holds both, so the source is inconsistent.
            raise CorruptCheckpointError(f"convert: entries {'/'.join(map(str, path))!r} and "
                                         f"{'/'.join(map(str, path[: i + 1]))!r} cannot both exist in one state")
        if i + 1 < len(path):
            node = node.setdefault(part, {})  # type: ignore[assignment, arg-type]
    node[path[-1]] = value  # type: ignore[index]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shardckpt", description="Inspect, verify, convert and export shardckpt checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="committed steps under a manager root")
    p.add_argument("root")
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("inspect", help="describe one checkpoint")
    p.add_argument("path")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("verify", help="check every block of one or more checkpoints")
    p.add_argument("paths", nargs="+")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("convert", help="rewrite a checkpoint as shardckpt (gathered in this process)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--from", dest="source_format", choices=["shardckpt", "dcp", "torch"], default="shardckpt",
                   help="source format; dcp and torch files pickle, so only convert files you trust")
    p.add_argument("--compression", choices=["zstd", "none"], default="zstd")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at DST (atomically)")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("export", help="write a checkpoint's tensors as Hugging Face safetensors (streamed)")
    p.add_argument("ckpt")
    p.add_argument("out", help="a local directory; other files in it (config.json) are left alone")
    p.add_argument("--format", choices=["safetensors"], default="safetensors")
    p.add_argument("--key", help="the subtree to export, nested keys joined with '/' (e.g. model)")
    p.add_argument("--prefix-strip", help="removed from the start of tensor names (e.g. _orig_mod.)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating-point tensors (others are kept)")
    p.add_argument("--max-shard-size", default="5GB", help="bytes per file: 5GB (default), 500MB, 2GiB, ...")
    p.add_argument("--tie", action="append", metavar="LATER=FIRST",
                   help="write LATER once, as FIRST (checked to be equal); for state dicts saved as plain dicts")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in OUT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_export)
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args))
    except CheckpointError as e:
        print(f"shardckpt {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
