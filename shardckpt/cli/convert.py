"""``convert``: gather a checkpoint (shardckpt, DCP or torch.save) and write it again as shardckpt.

Key selection (``--key``, ``--drop``), per-rank entries and an optional floating-point cast all
happen here, in the command, over the public API (``CheckpointReader`` to read one tensor at a
time, ``save`` to write). torch is imported when the command runs, never when the CLI starts.

Per-rank entries (saved inside ``shardckpt.PerRank``: RNG states, a rank's data position) stay
per-rank: a checkpoint can only hold rank ``r``'s entry if rank ``r`` saved it, so when any are
kept the output is written by one process per saving rank (spawned here, joined by a gloo group
over a file store; rank 0 writes the global state, rank ``r`` its own entries). Without per-rank
entries (or with ``--drop-per-rank``) everything is written by this process.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shardckpt.cli.output import emit_json, mb, progress
from shardckpt.errors import CheckpointError, CorruptCheckpointError, MissingKeysError, StateMismatchError

if TYPE_CHECKING:
    import torch

    from shardckpt.api import CheckpointReader
    from shardckpt.format.schema import TensorEntry, ValueEntry

CAST_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# A spawned rank that has not finished in this long is taken as hung (its peers then wait in a
# collective forever): every rank is stopped and the convert fails.
RANK_TIMEOUT_S = 3600.0
FAILURE_GRACE_S = 10.0  # after a first failure, how long the others may take to report theirs


@dataclass(frozen=True)
class ConvertJob:
    """What every writing rank needs to redo the same selection on its own (picklable: it is sent
    to the spawned ranks)."""

    src: str
    dst: str
    keys: tuple[str, ...]
    drops: tuple[str, ...]
    drop_per_rank: bool
    dtype: str | None
    compression: str
    metadata: dict[str, object]
    show_progress: bool = False


def cmd_convert(args: argparse.Namespace) -> int:
    """Rewrite SRC as a shardckpt checkpoint at DST; see the module docstring."""
    _check_destination(Path(args.src), Path(args.dst), args.overwrite)
    keys, drops = tuple(args.keys or ()), tuple(args.drops or ())
    if args.source_format != "shardckpt":
        doc = _convert_foreign(args, keys, drops)
    else:
        doc = _convert_shardckpt(args, keys, drops)
    if args.json:
        emit_json(doc)
    else:
        per_rank = doc["per_rank_tensors"] + doc["per_rank_values"]  # type: ignore[operator]
        print(f"{args.src} ({args.source_format}) -> {args.dst}: {doc['tensors']} tensors, {doc['values']} values"
              + (f", {per_rank} per-rank entries of {doc['world_size']} ranks" if per_rank else "")
              + (f", floating tensors cast to {doc['dtype']}" if doc["dtype"] else "")
              + f"; {mb(int(doc['bytes_raw']))} raw, {mb(int(doc['bytes_stored']))} stored")  # type: ignore[call-overload]
    return 0


# --- from shardckpt --------------------------------------------------------------------------


def _convert_shardckpt(args: argparse.Namespace, keys: tuple[str, ...], drops: tuple[str, ...]) -> dict[str, object]:
    from shardckpt.api import CheckpointReader

    with CheckpointReader(args.src) as reader:
        tensors, values = _selected(reader, keys, drops, args.drop_per_rank)
        per_rank = any(t.rank is not None for t in tensors) or any(v.rank is not None for v in values)
        world = reader.index.world_size if per_rank else 1
        metadata = dict(reader.index.metadata)
    if world > max(1, args.max_ranks):
        # One process per saving rank: a size field of the index must not start millions of them.
        raise StateMismatchError(
            f"{args.src}: keeping its per-rank entries means writing them from {world} processes (one per saving "
            f"rank), over --max-ranks {args.max_ranks}; pass --drop-per-rank to convert the global state only, or "
            "raise --max-ranks"
        )
    job = ConvertJob(str(args.src), str(args.dst), keys, drops, args.drop_per_rank, args.dtype, args.compression,
                     metadata, show_progress=not (args.quiet or args.json))
    counts = write_rank(0, 1, job) if world == 1 else _spawn_ranks(world, job)
    return {"src": str(args.src), "dst": str(args.dst), "from": "shardckpt", "world_size": world, **counts,
            "dtype": CAST_NAMES.get(args.dtype) if args.dtype else None}


def _selected(reader: CheckpointReader, keys: tuple[str, ...], drops: tuple[str, ...],
              drop_per_rank: bool) -> tuple[list[TensorEntry], list[ValueEntry]]:
    tensors, values = reader.select(list(keys) or None)
    keys_held = [t.key for t in tensors] + [v.key for v in values]
    unmatched = [d for d in drops if not any(_under(k, d) for k in keys_held)]
    if unmatched:
        raise MissingKeysError(f"{reader.where}: --drop {', '.join(repr(d) for d in unmatched)} selects nothing "
                               "(nested keys are joined with '/'; `shardckpt inspect` lists the keys)")
    tensors = [t for t in tensors if not any(_under(t.key, d) for d in drops)]
    values = [v for v in values if not any(_under(v.key, d) for d in drops)]
    if drop_per_rank:
        tensors = [t for t in tensors if t.rank is None]
        values = [v for v in values if v.rank is None]
    return tensors, values


def write_rank(rank: int, world: int, job: ConvertJob) -> dict[str, int]:
    """Read what rank ``rank`` writes (rank 0: the global entries, every rank: its own per-rank
    ones) one tensor at a time, and save it to ``job.dst`` (collective when ``world > 1``)."""
    from shardckpt.api import CheckpointReader, save
    from shardckpt.flatten import PerRank

    cast = _torch_dtype(job.dtype)
    with CheckpointReader(job.src) as reader:
        tensors, values = _selected(reader, job.keys, job.drops, job.drop_per_rank)
        # Rank 0 writes the global entries; every rank writes its own per-rank ones.
        mine_t = [t for t in tensors if t.rank == rank or (t.rank is None and rank == 0)]
        mine_v = [v for v in values if v.rank == rank or (v.rank is None and rank == 0)]
        reader.check(mine_t)  # every data file this rank reads, before the first allocation
        state: dict[str, object] = {}
        total = sum(t.itemsize * _numel(t.shape) for t in mine_t)
        bar = progress(argparse.Namespace(quiet=not job.show_progress or rank != 0), total, f"convert {job.src}")
        try:
            for t in mine_t:
                x = reader.read(t)
                if cast is not None and x.is_floating_point():
                    x = x.to(cast)
                _put(state, t.path, x if t.rank is None else PerRank(x))
                bar.update(t.itemsize * _numel(t.shape))
        finally:
            bar.close()
        for v in mine_v:
            value = reader.value(v)
            _put(state, v.path, value if v.rank is None else PerRank(value))
    result = save(state, job.dst, compression=job.compression, metadata=job.metadata)  # type: ignore[arg-type]
    return {"tensors": sum(t.rank is None for t in tensors), "values": sum(v.rank is None for v in values),
            "per_rank_tensors": sum(t.rank is not None for t in tensors),
            "per_rank_values": sum(v.rank is not None for v in values),
            "bytes_raw": result.bytes_raw, "bytes_stored": result.bytes_stored}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _spawn_ranks(world: int, job: ConvertJob) -> dict[str, int]:
    """Run ``write_rank`` on ``world`` fresh processes joined by gloo; rank 0's counts come back.
    Any rank's failure (or death) fails the convert, and no process is left behind."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: never fork a process that may hold threads
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="shardckpt-convert-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, world, store, job, out), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, tuple[str, object]] = {}
        try:
            deadline = time.monotonic() + RANK_TIMEOUT_S
            while len(results) < world:
                try:
                    rank, status, payload = out.get(timeout=1.0)
                    results[rank] = (status, payload)
                    if status != "ok":
                        # Its peers fail too, often first, with only "a peer died": give the
                        # others a moment to report, so the root cause can be named.
                        deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
                    continue
                except queue.Empty:
                    pass
                if any(status != "ok" for status, _ in results.values()):
                    if time.monotonic() > deadline:
                        break
                    continue
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if dead:
                    # A rank that put its result and exited may be seen dead before the result
                    # is read off the pipe: give the pipe a moment before calling it lost.
                    try:
                        rank, status, payload = out.get(timeout=10.0)
                        results[rank] = (status, payload)
                        continue
                    except queue.Empty:
                        pass
                if dead or time.monotonic() > deadline:
                    what = f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}" if dead else "a rank hung"
                    raise CheckpointError(f"convert {job.src} -> {job.dst}: {what} before finishing; nothing was "
                                          "committed unless every rank finished")
        finally:
            for p in procs:
                p.join(timeout=30 if len(results) == world else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    failures = [(r, payload) for r, (status, payload) in sorted(results.items()) if status != "ok"]
    if failures:
        # A rank that failed on its own (a corrupt block) before one that only saw a peer fail.
        rank, payload = min(failures, key=lambda f: (_is_knock_on(f[1]), f[0]))
        assert isinstance(payload, tuple)
        raise CheckpointError(f"convert {job.src} -> {job.dst}: rank {rank} failed: {payload[0]}: {payload[1]}")
    counts = results[0][1]
    assert isinstance(counts, dict)
    return counts


def _is_knock_on(payload: object) -> bool:
    """Whether a rank's failure only reports another rank's (a collective that lost its peer)."""
    return isinstance(payload, tuple) and payload[0] in ("CommunicationError", "RankFailedError")


def _rank_main(rank: int, world: int, store: str, job: ConvertJob, out: mp.Queue[object]) -> None:
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            counts = write_rank(rank, world, job)
        finally:
            dist.destroy_process_group()
        out.put((rank, "ok", counts))
    except CheckpointError as e:
        out.put((rank, "error", (type(e).__name__, str(e))))
    except BaseException as e:  # noqa: BLE001 - the parent reports every rank's failure
        out.put((rank, "error", (type(e).__name__, f"{e}\n{traceback.format_exc()}")))


# --- from DCP / torch.save ------------------------------------------------------------------


def _convert_foreign(args: argparse.Namespace, keys: tuple[str, ...], drops: tuple[str, ...]) -> dict[str, object]:
    from shardckpt.api import save

    foreign = _read_foreign(args)
    state = _pick(foreign, keys, drops, str(args.src))
    cast = _torch_dtype(args.dtype)
    tensors, values = _count_and_cast(state, cast)
    result = save(state, args.dst, compression=args.compression)
    return {"src": str(args.src), "dst": str(args.dst), "from": args.source_format, "world_size": 1,
            "tensors": tensors, "values": values, "per_rank_tensors": 0, "per_rank_values": 0,
            "bytes_raw": result.bytes_raw, "bytes_stored": result.bytes_stored,
            "dtype": CAST_NAMES.get(args.dtype) if args.dtype else None}


def _read_foreign(args: argparse.Namespace) -> dict[str, object]:
    if args.source_format == "safetensors":  # no pickle: names as in the file, flat ("model.norm.weight")
        from shardckpt.interop.safetensors_import import read_safetensors

        return dict(read_safetensors(args.src))
    # The only pickle readers, imported only for a migration that asks for them.
    if args.source_format == "dcp":
        from shardckpt.interop.dcp import read_dcp

        return read_dcp(args.src)
    from shardckpt.interop.torch_save import read_torch_save

    return read_torch_save(args.src)


def _pick(tree: dict[str, object], keys: tuple[str, ...], drops: tuple[str, ...], where: str) -> dict[str, object]:
    """The subtrees of ``tree`` under ``keys`` (all of it when none) minus those under ``drops``;
    keys are dict keys joined with '/', as in a checkpoint's entry keys."""
    out: dict[str, object] = tree
    if keys:
        out = {}
        for k in sorted(set(keys), key=len):
            if any(_under(k, other) for other in keys if other != k):
                continue  # inside another selected subtree: already taken whole
            path = _find(tree, k, where, "--key")
            _put(out, path, _walk(tree, path))
    for d in drops:
        path = _find(out, d, where, "--drop")
        parent = _walk(out, path[:-1])
        assert isinstance(parent, dict)
        del parent[path[-1]]
    return out


def _find(tree: dict[str, object], key: str, where: str, option: str) -> tuple[str | int, ...]:
    node: object = tree
    path: list[str | int] = []
    for part in key.split("/"):
        match = [k for k in node if str(k) == part] if isinstance(node, dict) else []
        if not match:
            tops = ", ".join(sorted(map(str, tree))[:20]) or "none"
            raise MissingKeysError(f"{where}: {option} {key!r} selects nothing (top-level keys: {tops}; "
                                   "nested keys are joined with '/')")
        path.append(match[0])
        node = node[match[0]]  # type: ignore[index]
    return tuple(path)


def _walk(tree: object, path: tuple[str | int, ...]) -> object:
    for part in path:
        tree = tree[part]  # type: ignore[index]
    return tree


def _count_and_cast(node: object, cast: torch.dtype | None) -> tuple[int, int]:
    """(tensors, leaf values) in a nested state; floating tensors are cast in place of themselves."""
    import torch

    tensors = values = 0
    if isinstance(node, dict | list):
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for k, v in items:
            if cast is not None and isinstance(v, torch.Tensor) and v.is_floating_point():
                node[k] = v.to(cast)  # type: ignore[index]
            t, n = _count_and_cast(v, cast)
            tensors, values = tensors + t, values + n
        return tensors, values
    return (1, 0) if isinstance(node, torch.Tensor) else (0, 1)


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    from shardckpt.format.schema import torch_dtype_of

    return torch_dtype_of(CAST_NAMES[name])


# --- shared --------------------------------------------------------------------------------


def _under(key: str, selector: str) -> bool:
    return key == selector or key.startswith(selector + "/")


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
