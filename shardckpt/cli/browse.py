"""``ls``, ``inspect`` and ``verify``: commands that only read.

``ls`` and ``inspect`` read JSON and list directories: nothing they import pulls in torch, so they
start in a fraction of a second (tests/unit/test_cli_fast_start.py). ``verify`` decodes blocks and
imports the reading pipeline (and torch) when it runs.
"""

from __future__ import annotations

import argparse
from collections import Counter

from shardckpt.catalog import committed_steps, read_index
from shardckpt.cli.output import emit_json, error_doc, mb, progress
from shardckpt.errors import CheckpointError
from shardckpt.format.values import decode_value, encode_value
from shardckpt.storage import parse_location


def cmd_ls(args: argparse.Namespace) -> int:
    """Committed steps under a manager root; exit 1 if one of them cannot be read."""
    steps = committed_steps(args.root)
    rows: list[dict[str, object]] = []
    failed = 0
    for step in steps:
        where = parse_location(args.root).join(f"step-{step:08d}")
        row: dict[str, object] = {"step": step, "path": str(where)}
        try:
            index = read_index(where)
        except CheckpointError as e:
            row["error"] = error_doc(e)
            failed += 1
        else:
            row.update(world_size=index.world_size, tensors=len(index.tensors), values=len(index.values),
                       bytes_raw=index.bytes_raw(), bytes_stored=index.bytes_stored(), save_id=index.save_id)
        rows.append(row)
    if args.json:
        emit_json({"root": str(args.root), "steps": rows})
    elif not rows:
        print(f"{args.root}: no committed checkpoints")
    for row in rows if not args.json else ():
        if "error" in row:
            err = row["error"]
            assert isinstance(err, dict)
            print(f"step {row['step']:>10}  unreadable: {err['type']}: {err['message']}")
        else:
            print(f"step {row['step']:>10}  {row['world_size']:>4} ranks  {row['tensors']:>6} tensors  "
                  f"{mb(int(row['bytes_stored'])):>12} stored  ({mb(int(row['bytes_raw']))} raw)")  # type: ignore[call-overload]
    return 1 if failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Tensors, values, files, sizes and codecs of one checkpoint."""
    index = read_index(args.path)
    codecs = Counter(b.codec for t in index.tensors for b in t.blocks)
    if args.json:
        emit_json({
            "path": str(args.path),
            "format_version": index.version,
            "save_id": index.save_id,
            "world_size": index.world_size,
            "files": [{"name": f.name, "rank": f.rank, "bytes": f.size} for f in index.files],
            "bytes_raw": index.bytes_raw(),
            "bytes_stored": index.bytes_stored(),
            "blocks_by_codec": dict(codecs),
            # The metadata in its stored typed-JSON form too, for the reasons given for values below.
            "metadata": encode_value(index.metadata, "metadata"),
            "tensors": [{"key": t.key, "dtype": t.dtype, "shape": list(t.shape), "rank": t.rank,
                         "blocks": len(t.blocks)} for t in index.tensors],
            # Values in their stored typed-JSON form (docs/format.md, "Values"): decoded, a dict
            # with both 0 and "0" as keys would print two "0" members, and a tuple key could not
            # print at all. A per-rank value is keyed "key@rank".
            "values": {v.key if v.rank is None else f"{v.key}@{v.rank}": v.value for v in index.values},
        })
        return 0
    ratio = index.bytes_raw() / index.bytes_stored() if index.bytes_stored() else 1.0
    print(f"{args.path}: format v{index.version}, save {index.save_id}, {index.world_size} ranks, "
          f"{mb(index.bytes_raw())} raw -> {mb(index.bytes_stored())} stored ({ratio:.2f}x), "
          f"blocks {dict(codecs)}")
    for t in index.tensors[: args.limit]:
        who = "" if t.rank is None else f"  (rank {t.rank})"
        print(f"  tensor {t.key:<50} {t.dtype:<9} {list(t.shape)}  {len(t.blocks)} blocks{who}")
    for v in index.values[: args.limit]:
        who = "" if v.rank is None else f"  (rank {v.rank})"
        print(f"  value  {v.key:<50} {decode_value(v.value, str(args.path))!r:.60}{who}")
    shown = min(args.limit, len(index.tensors)) + min(args.limit, len(index.values))
    hidden = len(index.tensors) + len(index.values) - shown
    if hidden > 0:
        print(f"  ... {hidden} more (--limit, or --json for all)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-read every block of each checkpoint: exit 1 if one fails, else 3 if one holds orphans."""
    from shardckpt.api import verify  # reads and decodes blocks: imports torch

    failed = warned = 0
    results: list[dict[str, object]] = []
    for path in args.paths:
        row: dict[str, object] = {"path": str(path)}
        try:
            total = read_index(path).bytes_stored()
            bar = progress(args, total, f"verify {path}")
            try:
                r = verify(path, on_block=bar.update)
            finally:
                bar.close()
        except CheckpointError as e:
            failed += 1
            row.update(ok=False, error=error_doc(e))
            if not args.json:
                print(f"FAIL {path}: {type(e).__name__}: {e}")
            results.append(row)
            continue
        row.update(ok=True, files=r.files, tensors=r.tensors, blocks=r.blocks, bytes_raw=r.bytes_raw,
                   bytes_stored=r.bytes_stored, orphans=list(r.orphans))
        results.append(row)
        if r.orphans:
            warned += 1
        if args.json:
            continue
        print(f"ok   {path}: {r.files} files, {r.tensors} tensors, {r.blocks} blocks, {mb(r.bytes_stored)} verified")
        if r.orphans:
            print(f"warn {path}: {len(r.orphans)} data file(s) not named by the index, left by an interrupted save "
                  f"(harmless; the next save into this directory removes them): {', '.join(r.orphans)}")
    code = 1 if failed else (3 if warned else 0)
    if args.json:
        emit_json({"ok": failed == 0, "exit_code": code, "results": results})
    return code
