"""How the ranks of a save agree on its plan, with as little traffic as a repeated save allows.

Planning needs every rank's tensor metadata (keys, shapes, boxes), which grows with ranks times
tensors, yet a training job saves the same structure over and over. So:

1. Every rank votes, in one all-reduce of six integers (``ballot``): whether its own fingerprint
   is the one its cached plan was made for, which cached plan that is, and a digest of its values
   that must agree between ranks. When every rank can reuse the same cached plan and the values
   agree, that is the plan (``by_ballot``): nothing is gathered, and each rank's values reach the
   coordinator later, with its write results (commit.py builds the index from those).
2. Otherwise (the first save, a changed structure, a failed rank, values that differ) every rank
   all-gathers its fingerprint, the token naming its cached plan, and its values (``agree``). When
   every token names exactly the gathered fingerprints, the cached plans serve.
3. Otherwise the tensor metadata goes to the coordinator only, which plans and scatters to each
   rank its share: what it writes, which replicas it hashes, and the set of tensor keys.

Every branch is taken from reduced or gathered data alone, so all ranks take the same one, and an
error of planning is raised on every rank.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import xxhash

from shardckpt.dist import Comm
from shardckpt.errors import CheckpointError, RankFailedError, ReplicaMismatchError, StateMismatchError
from shardckpt.flatten import TensorItem
from shardckpt.planning.boxes import Box
from shardckpt.planning.save_plan import (
    RankMeta,
    SavePlan,
    WriteItem,
    check_value_keys,
    plan_save,
    plan_values,
)


@dataclass(frozen=True)
class Share:
    """One rank's part of a save plan."""

    writes: list[WriteItem]
    replicated: list[str]  # keys of plain tensors it holds with other ranks (their hashes are compared)
    tensor_keys: frozenset[str]  # every tensor key of the save, on any rank


@dataclass(frozen=True)
class Agreed:
    save_id: str
    share: Share
    own_values: list[list[object]]  # this rank's value rows; the index gets them with its write results
    plan: SavePlan | None  # on the coordinator: the whole plan (its values come from the write results)
    planned: bool  # False when every rank's cached plan served


@dataclass(frozen=True)
class _Cached:
    token: str
    fps: tuple[str, ...]  # every rank's fingerprint, as the token names them
    share: Share
    plan: SavePlan | None


# (id of the job group, rank) -> the plan of its last save. The token, not the key, decides reuse:
# a group that reuses a dead one's id gets a different token unless its metadata is the same, and
# a plan is a pure function of the metadata.
_CACHE: dict[tuple[int, int], _Cached] = {}


# The last save's items (weakly), their metadata rows and fingerprint: a state whose items are
# the same objects again (ModelOptimizerState keeps them, flatten.py) needs neither recomputed.
_LAST_ROWS: tuple[list[weakref.ref[TensorItem]], list[list[object]], str] | None = None


def metadata_rows(items: Sequence[TensorItem]) -> tuple[list[list[object]], str]:
    """(each item's metadata row, their fingerprint). Items never change once made, so the same
    item objects give the same rows."""
    global _LAST_ROWS
    last = _LAST_ROWS
    if last is not None and len(last[0]) == len(items) and all(r() is t for r, t in zip(last[0], items)):
        return last[1], last[2]
    rows = [item.meta() for item in items]
    fp = fingerprint(rows)
    _LAST_ROWS = ([weakref.ref(t) for t in items], rows, fp)
    return rows, fp


def fingerprint(rows: Sequence[object]) -> str:
    """A 128-bit hash of this rank's tensor metadata rows (JSON keeps int and str path parts apart)."""
    return xxhash.xxh3_128_hexdigest(json.dumps(rows, separators=(",", ":")).encode())


def cached_token(comm: Comm) -> str | None:
    """The token of this rank's cached plan, sent in the first gather."""
    cached = _CACHE.get(_key(comm))
    return cached.token if cached is not None else None


def save_id_text(number: int) -> str:
    """A save id: 16 hex digits of the coordinator's random 63-bit number."""
    return f"{number:016x}"


def ballot(comm: Comm, fp: str | None, own_values: list[list[object]], block_bytes: int, number: int) -> list[int]:
    """This rank's vote on reusing the cached plan without a gather; ``fp`` is None when this
    rank failed before voting. Reduced with max over the ranks, ``[cannot, number, t, -t, v, -v]``
    tells whether any rank cannot, the coordinator's save number, whether every rank holds the same
    cached plan (t: bits of its token; max(t) == -max(-t) only when all are equal), and whether the
    values that must agree between ranks do (v: bits of their digest)."""
    cached = _CACHE.get(_key(comm))
    can = (
        fp is not None
        and cached is not None
        and len(cached.fps) == comm.world_size
        and cached.fps[comm.rank] == fp
        and cached.token == _token(list(cached.fps), block_bytes, comm.world_size)
        and not any(row[0] in cached.share.tensor_keys for row in own_values)
    )
    token = _bits(cached.token) if can and cached is not None else 0
    shared = _bits(_shared_values_digest(own_values))
    return [0 if can else 1, number if comm.is_coordinator else 0, token, -token, shared, -shared]


def by_ballot(comm: Comm, reduced: list[int], own_values: list[list[object]]) -> Agreed | None:
    """The cached plan, when the reduced ballots (``ballot``) say every rank may reuse it; else
    None, and the ranks gather (``agree``)."""
    cannot, number, token, neg_token, shared, neg_shared = reduced
    if cannot or token != -neg_token or shared != -neg_shared:
        return None
    return assumed(comm, own_values, save_id_text(number))


def assumed(comm: Comm, own_values: list[list[object]], save_id: str = "") -> Agreed:
    """The cached plan. Without ``save_id``: taken before the vote on it returns (which names the
    save), by a rank whose own ballot says it can reuse it."""
    cached = _CACHE[_key(comm)]
    return Agreed(save_id, cached.share, own_values, cached.plan, planned=False)


def _bits(hex_digest: str) -> int:
    return int(hex_digest[:15], 16)  # 60 bits: their negation fits an int64 too


def _shared_values_digest(own_values: list[list[object]]) -> str:
    """What must be equal on every rank: each value's key, path and kind, and the value itself
    unless it is per-rank (those differ by design)."""
    rows = [[key, path, per_rank, None if per_rank else value] for key, path, value, per_rank in own_values]
    return xxhash.xxh3_128_hexdigest(json.dumps(rows, separators=(",", ":")).encode())


def agree(comm: Comm, rows: list[list[object]], metas: list[RankMeta], block_bytes: int, what: str) -> Agreed:
    """Decide this save's plan; collective. ``rows`` are this rank's tensor metadata rows;
    ``metas[r]`` is rank r's first-gather payload: ``{"fp", "token", "values", "save_id"}``."""
    save_id = str(metas[0]["save_id"])
    plan_values(metas)  # the same error on every rank: every rank has every value
    own_values = cast("list[list[object]]", metas[comm.rank]["values"])
    fps = tuple(str(m["fp"]) for m in metas)
    token = _token(list(fps), block_bytes, comm.world_size)
    cached = _CACHE.get(_key(comm))
    if cached is not None and all(m["token"] == token for m in metas):
        check_value_keys(cached.share.tensor_keys, metas)
        return Agreed(save_id, cached.share, own_values, cached.plan, planned=False)
    _CACHE.pop(_key(comm), None)  # a failed agreement must not leave a stale plan behind

    gathered = comm.gather(rows, f"{what}: gathering tensor metadata")
    plan: SavePlan | None = None
    payloads: list[object] | None = None
    error: BaseException | None = None
    if gathered is not None:  # the coordinator plans for everyone
        try:
            full: list[RankMeta] = [{"tensors": r, "values": m["values"]} for r, m in zip(gathered, metas)]
            plan = plan_save(full, block_bytes)
            keys = sorted({s.key for s in plan.tensors})
            payloads = [_share_payload(plan, rank, keys) for rank in range(comm.world_size)]
        except Exception as e:  # noqa: BLE001 - the other ranks must learn it from the scatter
            error = e
            payloads = [{"error": f"{type(e).__name__}: {e}", "type": type(e).__name__}] * comm.world_size
    mine = cast("dict[str, object]", comm.scatter(payloads, f"{what}: sending each rank its plan"))
    if "error" in mine:
        if error is not None:
            raise error
        raise _error_from(mine, what)
    share = _share(mine)
    _CACHE[_key(comm)] = _Cached(token, fps, share, plan)
    return Agreed(save_id, share, own_values, plan, planned=True)


def _token(fps: list[str], block_bytes: int, world: int) -> str:
    return xxhash.xxh3_128_hexdigest(json.dumps([fps, block_bytes, world]).encode())


def _key(comm: Comm) -> tuple[int, int]:
    return (id(comm.group) if comm.group is not None else 0, comm.rank)


def _share_payload(plan: SavePlan, rank: int, keys: list[str]) -> dict[str, object]:
    writes = [[w.key, list(w.box.offsets), list(w.box.sizes), w.entry_rank] for w in plan.writes[rank]]
    return {"writes": writes, "replicated": plan.replicated(rank), "keys": keys}


def _share(payload: dict[str, object]) -> Share:
    rows = cast("list[tuple[str, list[int], list[int], int | None]]", payload["writes"])
    writes = [WriteItem(key, Box(tuple(offsets), tuple(sizes)), entry_rank) for key, offsets, sizes, entry_rank in rows]
    keys = cast("list[str]", payload["keys"])
    return Share(writes, cast("list[str]", payload["replicated"]), frozenset(keys))


_PLANNING_ERRORS: dict[str, type[CheckpointError]] = {
    cls.__name__: cls for cls in (CheckpointError, StateMismatchError, ReplicaMismatchError)
}


def _error_from(payload: dict[str, object], what: str) -> CheckpointError:
    """The coordinator's planning error, raised on this rank with the same type when it is one of
    planning's own (a bad state: the same error a local plan would raise)."""
    kind = _PLANNING_ERRORS.get(str(payload["type"]))
    message = str(payload["error"]).split(": ", 1)[-1]
    if kind is not None:
        return kind(message)
    return RankFailedError(f"{what}: planning failed on the coordinator (rank 0): {payload['error']}", {0: str(payload["error"])})
