"""Decide what each rank writes. A pure function of every rank's metadata, so all ranks compute the
same plan without another round of messages.

Replicas are written once: identical boxes held by several ranks (plain tensors, Replicate
placements) get one writer, and a large replicated box is cut into row bands shared among its
holders, so no rank writes every replicated tensor. Assignment is greedy largest-first onto the
least-loaded holder, which keeps the per-rank bytes within one band of each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from shardckpt.errors import ReplicaMismatchError, StateMismatchError
from shardckpt.format.schema import DTYPE_ITEMSIZE, PathPart
from shardckpt.planning.boxes import Box, TooIrregular, find_overlap


@dataclass(frozen=True)
class WriteItem:
    key: str
    box: Box
    entry_rank: int | None  # set for per-rank tensors


@dataclass(frozen=True)
class TensorSpec:
    key: str
    path: tuple[PathPart, ...]
    dtype: str
    shape: tuple[int, ...]
    entry_rank: int | None
    plain: bool
    holders: tuple[int, ...] = ()


@dataclass(frozen=True)
class ValueSpec:
    key: str
    path: tuple[PathPart, ...]
    value: object
    entry_rank: int | None


@dataclass
class SavePlan:
    tensors: list[TensorSpec]
    # The values of the save that made the plan. A plan is reused by later saves, so the index
    # takes each save's own values from its write results instead (commit.build_index).
    values: list[ValueSpec]
    writes: dict[int, list[WriteItem]] = field(default_factory=dict)

    def replicated(self, rank: int) -> list[str]:
        """Keys of the plain tensors that ``rank`` holds together with other ranks: the replicas
        whose equality save checks."""
        return [
            s.key for s in self.tensors
            if s.plain and s.entry_rank is None and len(s.holders) > 1 and rank in s.holders
        ]


RankMeta = Mapping[str, object]
# One row of ``meta["tensors"]`` (``TensorItem.meta()``) and of ``meta["values"]``, as they arrive after
# the JSON gather (lists, not tuples; indexing and unpacking work the same).
TensorRow = tuple[str, list[PathPart], str, list[int], list[int], list[int], bool, bool]
ValueRow = tuple[str, list[PathPart], object, bool]


def _tensor_rows(meta: RankMeta) -> list[TensorRow]:
    return cast("list[TensorRow]", meta["tensors"])


def _value_rows(meta: RankMeta) -> list[ValueRow]:
    return cast("list[ValueRow]", meta["values"])


def plan_save(metas: list[RankMeta], block_bytes: int) -> SavePlan:
    """``metas[r]`` is rank r's ``{"tensors": [TensorItem.meta()], "values": [[key, path, value, per_rank]]}``."""
    specs: dict[tuple[str, int | None], TensorSpec] = {}
    boxes: dict[tuple[str, int | None], dict[Box, list[int]]] = {}
    for rank, meta in enumerate(metas):
        for key, path, dtype, shape, offsets, sizes, per_rank, plain in _tensor_rows(meta):
            ident = (key, rank if per_rank else None)
            spec = TensorSpec(key, tuple(path), dtype, tuple(shape), ident[1], bool(plain))
            known = specs.setdefault(ident, spec)
            if (known.dtype, known.shape, known.plain) != (spec.dtype, spec.shape, spec.plain):
                raise StateMismatchError(
                    f"tensor {key!r} differs between ranks: {known.dtype}{list(known.shape)} vs "
                    f"{spec.dtype}{list(spec.shape)} on rank {rank}"
                )
            boxes.setdefault(ident, {}).setdefault(Box(tuple(offsets), tuple(sizes)), []).append(rank)
    _check_kinds(specs, metas)

    plan = SavePlan(tensors=[], values=plan_values(metas), writes={r: [] for r in range(len(metas))})
    jobs: list[tuple[int, WriteItem, list[int]]] = []
    for ident, spec in sorted(specs.items(), key=lambda kv: (kv[0][0], kv[0][1] if kv[0][1] is not None else -1)):
        held = boxes[ident]
        _check_cover(spec, held)
        itemsize = DTYPE_ITEMSIZE[spec.dtype]
        holders = sorted({r for ranks in held.values() for r in ranks})
        plan.tensors.append(TensorSpec(spec.key, spec.path, spec.dtype, spec.shape, spec.entry_rank, spec.plain, tuple(holders)))
        for box, ranks in held.items():
            if box.volume == 0:
                continue
            for band in _bands(box, len(ranks), itemsize, block_bytes):
                jobs.append((band.volume * itemsize, WriteItem(spec.key, band, spec.entry_rank), sorted(ranks)))
    load = [0] * len(metas)
    for nbytes, item, ranks in sorted(jobs, key=lambda j: -j[0]):
        writer = min(ranks, key=lambda r: (load[r], r))
        load[writer] += nbytes
        plan.writes[writer].append(item)
    return plan


def _check_kinds(specs: dict[tuple[str, int | None], TensorSpec], metas: list[RankMeta]) -> None:
    per_rank = {k for k, r in specs if r is not None}
    global_ = {k for k, r in specs if r is None}
    for key in sorted(per_rank & global_):
        raise StateMismatchError(f"tensor {key!r} is wrapped in PerRank on some ranks but not on others")
    check_value_keys({k for k, _ in specs}, metas)


def check_value_keys(tensor_keys: set[str] | frozenset[str], metas: list[RankMeta]) -> None:
    """No key may be a tensor on one rank and a value on another."""
    for rank, meta in enumerate(metas):
        for key, *_ in _value_rows(meta):
            if key in tensor_keys:
                raise StateMismatchError(f"key {key!r} is a tensor on some ranks but a value on rank {rank}")


def _check_cover(spec: TensorSpec, held: dict[Box, list[int]]) -> None:
    distinct = [b for b in held if b.volume > 0]
    try:
        clash = find_overlap(distinct)
    except TooIrregular as e:
        raise StateMismatchError(f"tensor {spec.key!r}: the ranks' shards: {e}") from None
    if clash is not None:
        a, b = distinct[clash[0]], distinct[clash[1]]
        raise StateMismatchError(
            f"tensor {spec.key!r}: shards on ranks {held[a]} and {held[b]} overlap without being equal; "
            "this layout cannot be saved"
        )
    total = sum(b.volume for b in distinct)
    if total != math.prod(spec.shape):
        raise StateMismatchError(
            f"tensor {spec.key!r}: the ranks' shards cover {total} of {math.prod(spec.shape)} elements"
        )


def _bands(box: Box, holders: int, itemsize: int, block_bytes: int) -> list[Box]:
    """Cut a replicated box into at most ``holders`` row bands of at least two blocks each."""
    nbytes = box.volume * itemsize
    if holders < 2 or not box.sizes or box.sizes[0] < 2 or nbytes < 2 * block_bytes:
        return [box]
    parts = min(holders, box.sizes[0], nbytes // (2 * block_bytes))
    rows = box.sizes[0]
    bands = []
    for i in range(parts):
        lo, hi = rows * i // parts, rows * (i + 1) // parts
        bands.append(Box((box.offsets[0] + lo,) + box.offsets[1:], (hi - lo,) + box.sizes[1:]))
    return bands


def plan_values(metas: Sequence[RankMeta]) -> list[ValueSpec]:
    """The values to store, from every rank's ``meta["values"]``; raises when a value that is not
    per-rank differs between ranks."""
    out: dict[tuple[str, int | None], ValueSpec] = {}
    first_rank: dict[str, int] = {}
    for rank, meta in enumerate(metas):
        for key, path, value, per_rank in _value_rows(meta):
            if per_rank:
                out[(key, rank)] = ValueSpec(key, tuple(path), value, rank)
                continue
            known = out.get((key, None))
            if known is None:
                out[(key, None)] = ValueSpec(key, tuple(path), value, None)
                first_rank[key] = rank
            elif known.value != value:
                raise ReplicaMismatchError(
                    f"value {key!r} differs between rank {first_rank[key]} ({known.value!r}) and rank {rank} "
                    f"({value!r}); wrap it in shardckpt.PerRank to keep each rank's value"
                )
    kinds: dict[str, set[bool]] = {}
    for key, entry_rank in out:
        kinds.setdefault(key, set()).add(entry_rank is None)
    for key, kind in kinds.items():
        if len(kind) > 1:
            raise StateMismatchError(f"value {key!r} is wrapped in PerRank on some ranks but not on others")
    return sorted(out.values(), key=lambda v: (v.key, -1 if v.entry_rank is None else v.entry_rank))
