"""Public entry points: they put the stages in order and hold no byte or slicing logic."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist

from shardckpt.catalog import read_index as read_index  # re-export (its old home)
from shardckpt.commit import read_committed_index
from shardckpt.dist import Comm
from shardckpt.errors import CorruptCheckpointError, MissingKeysError, StateMismatchError
from shardckpt.flatten import join_key
from shardckpt.format.schema import DATA_DIR, CheckpointIndex, PathPart, TensorEntry, ValueEntry
from shardckpt.format.values import decode_value
from shardckpt.loading import LoadWalk
from shardckpt.options import Compression, compression_options, io_threads
from shardckpt.pipeline.reader import ReadRequest, check_files, execute_reads, read_checked_block, run_bounded
from shardckpt.planning.boxes import Box
from shardckpt.planning.load_plan import BlockRead, plan_reads
from shardckpt.saving import SaveResult, prepare_save, result_of, save_streaming
from shardckpt.storage import Storage, open_storage
from shardckpt.storage.s3 import S3Options

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


def save(
    state: dict[str, object],
    path: PathLike,
    *,
    process_group: dist.ProcessGroup | None = None,
    compression: Compression = "auto",
    check_replicas: bool = True,
    metadata: Mapping[str, object] | None = None,
    s3: S3Options | None = None,
) -> SaveResult:
    """Save ``state`` to the directory ``path``; collective over the process group.

    Returns once the checkpoint is committed: every rank's data is fsynced and the coordinator has
    atomically published ``index.json``. A crash at any point leaves the previous checkpoint at
    ``path`` (if any) intact. Plain tensors are taken as replicated and written once in total;
    they must be equal on every rank unless wrapped in :class:`shardckpt.PerRank`.

    ``nn.Module`` and ``torch.optim.Optimizer`` objects are saved through
    ``torch.distributed.checkpoint.state_dict`` (FSDP2/TP state stays sharded, optimizer state is
    keyed by parameter name): an optimizer is paired with the module in ``state`` that owns its
    parameters, and the checkpoint is the one ``get_state_dict(model, optim)`` would give.

    ``path`` may be an ``s3://bucket/prefix`` URL; ``s3`` then overrides the AWS environment
    (endpoint, credentials, region, part size; see ``S3Options``). ``load``, ``verify``,
    ``async_save``, ``load_all`` and ``CheckpointManager`` take the same ``s3`` keyword.

    Example::

        shardckpt.save({"model": model, "optim": optim, "step": step}, "ckpt/step-100")
    """
    comm = Comm.for_group(process_group)
    options = compression_options(compression)
    t0 = time.perf_counter()
    prep = prepare_save(state, path, comm, options, check_replicas, metadata, s3=s3)
    try:
        with ThreadPoolExecutor(io_threads(), thread_name_prefix="shardckpt-save") as pool:
            stall = time.perf_counter() - t0
            done = save_streaming(prep, comm, pool)
    finally:
        prep.release()
    return result_of(prep, done, stall, time.perf_counter() - t0 - stall)


def load(
    state: dict[str, object],
    path: PathLike,
    *,
    process_group: dist.ProcessGroup | None = None,
    strict: bool = True,
    s3: S3Options | None = None,
    read_once: bool = False,
    dtype_cast: bool = False,
) -> None:
    """Fill ``state`` in place from the checkpoint at ``path``; collective.

    Tensors and DTensors receive the saved values re-sharded to their current placement and world
    size (each rank reads only the blocks overlapping its shards); ``nn.Module`` and
    ``torch.optim.Optimizer`` objects go through ``set_state_dict`` (see ``save``); other objects
    with ``state_dict`` / ``load_state_dict`` are loaded through them; other values are replaced
    in their dict or list. With ``strict`` every key of ``state`` must be in the checkpoint, also
    keys inside a value that is replaced whole (keys the checkpoint has and ``state`` lacks are
    ignored, so a subset can be loaded). On failure every rank raises and the state may be partly
    loaded.

    With ``read_once``, each stored block that several ranks need (a replicated model, HSDP's
    replicas) is read from storage by one of them and sent to the others over the process group
    (gloo, CPU bytes): storage serves each block once, not once per replica (docs/multinode.md).

    A tensor saved in another dtype than its target raises ``StateMismatchError``; with
    ``dtype_cast``, a floating-point tensor fills a floating-point target of another dtype, cast
    (an fp32 checkpoint into a bf16 model). Other dtype changes are refused either way.

    Example::

        shardckpt.load({"model": model, "optim": optim, "step": 0}, "ckpt/step-100")
    """
    comm = Comm.for_group(process_group)
    load_from(state, open_storage(path, s3=s3), str(path), comm, strict=strict, read_once=read_once,
              dtype_cast=dtype_cast)


def load_from(
    state: dict[str, object], storage: Storage, where: str, comm: Comm, *, strict: bool = True,
    read_once: bool = False, dtype_cast: bool = False, file_readers: dict[str, frozenset[int]] | None = None,
    index: CheckpointIndex | None = None,
) -> None:
    """``load`` from an open ``storage`` (closed when done); ``where`` names it in messages.

    ``file_readers`` is for storages that differ by rank (the memory tier: each rank sees its own
    node's files): it names the ranks that hold each data file, and blocks then travel from a rank
    that holds them to the ranks that need them (``read_shared``). ``index``, on a rank whose
    storage holds no index (a memory-tier node that holds no step), is the one to use."""
    walks: list[LoadWalk] = []
    try:
        _load_from(state, storage, where, comm, strict, read_once, dtype_cast, file_readers, walks, index)
    except BaseException:
        for walk in walks:
            walk.undo_prefill()  # no optimizer is left holding uninitialized state
        raise


def _load_from(
    state: dict[str, object], storage: Storage, where: str, comm: Comm, strict: bool, read_once: bool,
    dtype_cast: bool, file_readers: dict[str, frozenset[int]] | None, walks: list[LoadWalk],
    given: CheckpointIndex | None,
) -> None:
    path = where
    try:
        index, ids = comm.run(f"load from {path}: reading the index",
                              lambda: _read_index_and_id(storage) if given is None else (given, given.save_id))
        if len(set(ids)) > 1:
            raise CorruptCheckpointError(
                f"{where}: ranks read different indexes ({sorted(set(map(str, ids)))}); was the checkpoint "
                "replaced during the load, or is the directory not shared?"
            )
        walk = LoadWalk(index, comm.rank, where, dtype_cast=dtype_cast)
        walks.append(walk)

        def match() -> tuple[None, object]:
            walk.fill_root(state)
            if strict and walk.missing:
                shown = ", ".join(repr(k) for k in walk.missing[:20])
                more = f" and {len(walk.missing) - 20} more" if len(walk.missing) > 20 else ""
                raise MissingKeysError(
                    f"{where}: rank {comm.rank}: keys not in the checkpoint: {shown}{more} "
                    "(pass strict=False to load the rest)"
                )
            return None, None

        def read() -> tuple[None, object]:
            match()
            files = {r.block.file for req in walk.requests for r in req.reads}
            check_files(storage, index, files, where)
            with ThreadPoolExecutor(io_threads(), thread_name_prefix="shardckpt-load") as pool:
                execute_reads(storage, index, walk.requests, pool, where)
            return None, None

        if (read_once or file_readers is not None) and comm.world_size > 1:
            from shardckpt.shared_reads import read_shared

            comm.run(f"load from {path}", match)
            with ThreadPoolExecutor(io_threads(), thread_name_prefix="shardckpt-load") as pool:
                read_shared(storage, index, walk.requests, comm, pool, where, file_readers)
        else:
            comm.run(f"load from {path}", read)
    finally:
        storage.close()

    def apply() -> tuple[None, object]:
        # In a gather of its own, so that one rank's failing load_state_dict makes every rank raise.
        # (A load_state_dict that runs collectives must raise on every rank alike, or its peers wait.)
        for obj, filled in walk.statefuls:
            try:
                obj.load_state_dict(filled)  # type: ignore[attr-defined]
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise StateMismatchError(
                    f"{where}: rank {comm.rank}: {type(obj).__name__}.load_state_dict rejected the saved state: "
                    f"{type(e).__name__}: {e}"
                ) from e
        return None, None

    comm.run(f"load from {path}: load_state_dict", apply)


def _read_index_and_id(storage: Storage) -> tuple[CheckpointIndex, object]:
    index = read_committed_index(storage)
    return index, index.save_id


@dataclass(frozen=True)
class VerifyReport:
    path: str
    files: int
    tensors: int
    blocks: int
    bytes_raw: int
    bytes_stored: int
    # Data files the index does not name: left by an interrupted save into the same directory.
    # Not corruption (the checkpoint loads in full); the next save there removes them.
    orphans: tuple[str, ...] = ()


def verify(
    path: PathLike, *, s3: S3Options | None = None, on_block: Callable[[int], object] | None = None
) -> VerifyReport:
    """Re-read every stored byte against its checksum and decode it; raises a CheckpointError on any
    missing, truncated, swapped or corrupt data file or block. Files the index does not name are
    reported in ``orphans``, not raised. Reads only: nothing is written or deleted.

    ``on_block(stored_bytes)`` is called (from a reader thread) as each block passes: the CLI's
    progress bar."""
    storage = open_storage(path, s3=s3)
    where = str(path)
    try:
        index = read_committed_index(storage)
        check_files(storage, index, set(range(len(index.files))), where)
        live = {f.name for f in index.files}
        orphans = tuple(n for n in storage.list(DATA_DIR) if n not in live)
        if orphans:
            log.warning("%s: data files not named by the index (left by an interrupted save): %s", where, list(orphans))
        jobs: list[tuple[TensorEntry, BlockRead]] = []
        for entry in index.tensors:
            jobs.extend((entry, r) for r in plan_reads(entry, Box.full(entry.shape), where))
        # Streamed: each decoded block is dropped once checked, so memory holds a few blocks in
        # flight, not the checkpoint.
        threads = io_threads()
        with ThreadPoolExecutor(threads, thread_name_prefix="shardckpt-verify") as pool:
            checks = (partial(_then, partial(read_checked_block, storage, index, entry, r, where), on_block, r.block.length)
                      for entry, r in jobs)
            run_bounded(pool, checks, 2 * threads, where)
    finally:
        storage.close()
    return VerifyReport(
        where, len(index.files), len(index.tensors), len(jobs), index.bytes_raw(), index.bytes_stored(), orphans
    )


def _then(job: Callable[[], object], on_done: Callable[[int], object] | None, n: int) -> None:
    job()
    if on_done is not None:
        on_done(n)


class ByRank(dict[int, object]):
    """A per-rank entry (saved inside :class:`shardckpt.PerRank`) as ``load_all`` returns it: saving
    rank -> that rank's tensor or value. Its own type, so that it is never mistaken for a dict
    with int keys that the state itself held."""


class CheckpointReader:
    """Read-only access to one checkpoint with no target state: its index, and any tensor (or any
    box of one) as a plain CPU tensor, read and verified on demand. ``load_all`` and the
    safetensors export are built on it; use it to stream a large checkpoint one tensor at a time.

    Memory is allocated only for what is read, and only after the data files holding it have been
    checked against the index (size and header): the index is validated against the declared file
    sizes, so a hostile index cannot make a read allocate more than the files really hold.

    Example::

        with shardckpt.CheckpointReader("ckpt/step-100") as reader:
            for entry in reader.select(["model"])[0]:
                print(entry.key, reader.read(entry).norm())
    """

    def __init__(self, path: PathLike, *, s3: S3Options | None = None) -> None:
        self.where = str(path)
        self._storage = open_storage(path, s3=s3)
        try:
            self.index = read_committed_index(self._storage)
        except BaseException:
            self._storage.close()
            raise
        self._checked: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._storage.close()

    def select(self, keys: str | Iterable[str] | None = None) -> tuple[list[TensorEntry], list[ValueEntry]]:
        """The tensor and value entries under ``keys`` (each a key like ``model/layers.0.weight``
        or a prefix of whole path parts like ``model``; None: all), per-rank ones included.
        A key that selects nothing raises ``MissingKeysError`` naming it."""
        tensors, values = list(self.index.tensors), list(self.index.values)
        if keys is None:
            return tensors, values
        wanted = [keys] if isinstance(keys, str) else list(keys)
        entries: list[TensorEntry | ValueEntry] = [*tensors, *values]
        unmatched = [k for k in wanted if not any(_under(e.key, k) for e in entries)]
        if unmatched:
            tops = sorted({str(e.path[0]) for e in entries if e.path})
            raise MissingKeysError(
                f"{self.where}: keys not in the checkpoint: {', '.join(repr(k) for k in unmatched)} "
                f"(top-level keys: {', '.join(tops[:20]) or 'none'}; nested keys are joined with '/')"
            )
        return ([e for e in tensors if any(_under(e.key, k) for k in wanted)],
                [e for e in values if any(_under(e.key, k) for k in wanted)])

    def check(self, entries: Iterable[TensorEntry]) -> None:
        """Check the data files holding ``entries`` (size and header) before anything is allocated
        for them; ``read`` does it too, this makes a bad file fail before a long job starts."""
        files = {b.file for e in entries for b in e.blocks} - self._checked
        if files:
            check_files(self._storage, self.index, files, self.where)
            self._checked |= files

    def read(self, entry: TensorEntry, box: Box | None = None) -> torch.Tensor:
        """The tensor of ``entry`` (or only ``box`` of it), verified and decoded, on the CPU."""
        needed = Box.full(entry.shape) if box is None else box
        reads = plan_reads(entry, needed, self.where)
        if needed.volume == 0:
            return torch.empty(needed.sizes, dtype=entry.torch_dtype)
        self.check([entry])
        # Sized by execute_reads, after the check above (see ReadRequest.allocate).
        request = ReadRequest(entry, needed, torch.empty(0, dtype=entry.torch_dtype), reads, True)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(io_threads(), thread_name_prefix="shardckpt-read")
        execute_reads(self._storage, self.index, [request], self._pool, self.where)
        return request.target

    def value(self, entry: ValueEntry) -> object:
        """The decoded value of ``entry``."""
        return decode_value(entry.value, f"{self.where}: value {entry.key!r}")


def load_all(
    path: PathLike,
    keys: str | Iterable[str] | None = None,
    *,
    per_rank: Literal["by_rank", "skip"] = "by_rank",
    s3: S3Options | None = None,
) -> dict[str, object]:
    """The checkpoint's state with no template: plain CPU tensors and decoded values, nested as saved.

    ``keys`` selects entries: each a full key (``"model/layers.0.weight"``) or a prefix of whole
    path parts (``"model"``); a key that selects nothing raises ``MissingKeysError``. Sharded
    tensors come back whole (gathered from every rank's blocks). For inspection and export, in one
    process; no torch.distributed is needed. Every data file read is checked against the index
    before any tensor is allocated, and every block against its checksum.

    What comes back differs from what was saved in two ways the index cannot tell:

    - Containers that held tensors come back as dicts; a list among them is a dict keyed
      ``0..n-1``. (Containers without tensors were stored whole and come back exactly.)
    - A module or optimizer comes back as its state dict; a module's tied parameter only under its
      first name (docs/parallel_layouts.md).

    Per-rank entries (saved inside :class:`shardckpt.PerRank`) come back as a :class:`ByRank`
    dict, saving rank -> value, in place of each tensor or value; ``per_rank="skip"`` leaves them out.

    Example::

        state = shardckpt.load_all("ckpt/step-100", ["model", "step"])
        state["model"]["layers.0.weight"].shape, state["step"]
    """
    if per_rank not in ("by_rank", "skip"):
        raise StateMismatchError(f"per_rank must be 'by_rank' or 'skip', not {per_rank!r}")
    with CheckpointReader(path, s3=s3) as reader:
        tensors, values = reader.select(keys)
        if per_rank == "skip":
            tensors = [t for t in tensors if t.rank is None]
            values = [v for v in values if v.rank is None]
        reader.check(tensors)  # every file, before the first tensor is allocated
        state: dict[str, object] = {}
        for t in tensors:
            _place(state, t.path, t.rank, reader.read(t), reader.where)
        for v in values:
            _place(state, v.path, v.rank, reader.value(v), reader.where)
    return state


def _under(key: str, selector: str) -> bool:
    return key == selector or key.startswith(selector + "/")


def _place(root: dict[str, object], path: tuple[PathPart, ...], rank: int | None, value: object, where: str) -> None:
    node: dict[PathPart, object] = root  # type: ignore[assignment]
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict) or isinstance(child, ByRank):
            raise CorruptCheckpointError(
                f"{where}: entries {join_key(path[: i + 1])!r} and {join_key(path)!r} cannot both exist in one state"
            )
        node = child
    last = path[-1] if path else ""
    clash = last in node and (rank is None or not isinstance(node[last], ByRank) or rank in node[last])  # type: ignore[operator]
    if clash:
        raise CorruptCheckpointError(f"{where}: entry {join_key(path)!r} appears twice, or with entries below it")
    if rank is None:
        node[last] = value
    else:
        node.setdefault(last, ByRank())[rank] = value  # type: ignore[index]
