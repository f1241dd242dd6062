"""The only importer of torch.distributed. Collectives here carry failures: each rank contributes
either its result or its error, and when any rank failed every rank raises, so one rank's bad input
never leaves the others hanging in the next collective."""

from __future__ import annotations

import json
import logging
import secrets
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar, cast

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from shardckpt.errors import (
    CheckpointError,
    CheckpointIOError,
    CommunicationError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    IndexFormatError,
    RankFailedError,
    StateMismatchError,
    StorageAccessError,
)
from shardckpt.options import collective_timeout_seconds, restarts_share_the_store
from shardckpt.storage.faults import hit

log = logging.getLogger(__name__)
T = TypeVar("T")


class Comm:
    """A process group seen as (rank, world size, failure-aware gather)."""

    def __init__(self, group: dist.ProcessGroup | None, side: dist.ProcessGroupGloo | None = None) -> None:
        self.group = group
        self._side = side  # set on a side group: gathers then run over it, not over ``group``
        if group is None:
            self.rank, self.world_size = 0, 1
        else:
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)

    @staticmethod
    def for_group(process_group: dist.ProcessGroup | None) -> Comm:
        if process_group is not None:
            return Comm(process_group)
        if dist.is_available() and dist.is_initialized():
            warn_if_restarts_share_the_store()
            return Comm(dist.group.WORLD)
        return Comm(None)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def all_gather(self, payload: object, what: str = "a collective") -> list[object]:
        """Gather a JSON-able payload from every rank (plain JSON on the wire, as elsewhere).

        A collective that breaks (a peer died, a connection closed, the timeout passed) raises
        ``CommunicationError``: this rank then cannot know what the others did."""
        if self.group is None:
            return [payload]
        out: list[str | None] = [None] * self.world_size
        text = json.dumps(payload)
        try:
            hit("gather")
            if self._side is not None:
                out = [b.decode() for b in _gather_bytes(self._side, text.encode())]
            else:
                dist.all_gather_object(out, text, group=self.group)
        except (RuntimeError, OSError) as e:  # gloo/NCCL failures are RuntimeError subclasses
            raise self._lost(what, e) from e
        return [json.loads(s) for s in out if s is not None]

    def gather(self, payload: object, what: str = "a collective") -> list[object] | None:
        """Gather a JSON-able payload from every rank to the coordinator only: it gets the payloads
        in rank order, the other ranks None. What grows with the world size (every rank's block
        records, its tensor metadata) goes this way: nobody else needs it."""
        if self.group is None:
            return [payload]
        data = json.dumps(payload).encode()
        try:
            hit("gather")
            if self._side is not None:
                got = _gather_bytes_to_root(self._side, data)
            else:
                out: list[object] | None = [None] * self.world_size if self.is_coordinator else None
                dist.gather_object(data, out, group=self.group, group_dst=0)
                got = cast("list[bytes]", out)
        except (RuntimeError, OSError) as e:
            raise self._lost(what, e) from e
        return [json.loads(b) for b in got] if got is not None else None

    def scatter(self, payloads: list[object] | None, what: str = "a collective") -> object:
        """The coordinator sends ``payloads[r]`` (JSON-able) to each rank r; every rank returns its
        own. The other ranks pass None. Over the job group only (it runs on the caller's thread)."""
        if self.group is None:
            assert payloads is not None
            return payloads[0]
        assert self._side is None, "scatter runs over the job group"
        texts = [json.dumps(p) for p in payloads] if payloads is not None else None
        out: list[object] = [None]
        try:
            hit("gather")
            dist.scatter_object_list(out, texts, group=self.group, group_src=0)
        except (RuntimeError, OSError) as e:
            raise self._lost(what, e) from e
        return json.loads(str(out[0]))

    def _lost(self, what: str, e: BaseException) -> CommunicationError:
        return CommunicationError(
            f"{what}: rank {self.rank} lost contact with the other ranks of its group ({_first_line(e)}); "
            "a peer process died or the network failed"
        )

    def run(
        self, what: str, fn: Callable[[], tuple[T, object]], typed: bool = False, to_coordinator: bool = False
    ) -> tuple[T, list[object]]:
        """Run ``fn`` locally, then gather its JSON-able payload from every rank.

        ``fn`` returns (local result, payload). If it raised on any rank, that rank re-raises its own
        error and the ranks that succeeded raise ``RankFailedError`` naming the failed ranks, so no
        rank goes on into a collective that the failed one will never join. With ``typed``, they
        raise the error type of the lowest failed rank instead (when it is a plain CheckpointError
        subclass): where one rank works for all (a shared read), a corrupt block is a
        ``CorruptCheckpointError`` on every rank that needed it, as in a load without sharing.
        With ``to_coordinator``, every rank learns only whether all succeeded, and the payloads go to
        the coordinator alone (``gather``): the other ranks get an empty list.
        """
        error: BaseException | None = None
        local: T | None = None
        payload: object = None
        try:
            local, payload = fn()
        except BaseException as e:  # noqa: BLE001 - every failure (SystemExit too) must reach the gather, or peers hang
            error = e
        return self.settle(what, local, payload, error, typed, to_coordinator)

    def settle(
        self, what: str, local: T | None, payload: object, error: BaseException | None, typed: bool = False,
        to_coordinator: bool = False,
    ) -> tuple[T, list[object]]:
        """The gather half of ``run``, for a local step that already ran: ``error`` is what it
        raised on this rank, else None (then ``local`` and ``payload`` are its results)."""
        ok = None if to_coordinator else payload  # with to_coordinator, only the outcome goes to every rank
        mine = {"ok": ok} if error is None else {"error": f"{type(error).__name__}: {error}", "type": type(error).__name__}
        try:
            gathered = self.all_gather(mine, what)
        except CommunicationError:
            if error is not None:  # this rank's own failure is the cause worth reporting
                raise _as_checkpoint_error(error, what, self.rank) from None
            raise
        if error is not None:
            raise _as_checkpoint_error(error, what, self.rank)
        failures = {r: str(g["error"]) for r, g in enumerate(gathered) if isinstance(g, dict) and "error" in g}
        if failures:
            detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
            first = gathered[min(failures)]
            kind = _PLAIN_ERRORS.get(str(first.get("type"))) if typed and isinstance(first, dict) else None
            if kind is not None:
                raise kind(f"{what} failed on rank(s) {sorted(failures)}: {detail}")
            raise RankFailedError(f"{what} failed on rank(s) {sorted(failures)}: {detail}", failures)
        if to_coordinator:
            return local, self.gather(payload, what) or []  # type: ignore[return-value]
        return local, [g["ok"] for g in gathered if isinstance(g, dict)]  # type: ignore[return-value]

    def vote(self, ballot: list[int], what: str, error: BaseException | None = None) -> list[int]:
        """All-reduce (max) of a few integers: one small collective where a gather would take two
        and move every rank's payload to every rank. ``error`` is this rank's own failure before
        the vote (its ballot says so): when the collective breaks, that is the error raised."""
        return self.vote_start(ballot, what, error).result()

    def vote_start(self, ballot: list[int], what: str, error: BaseException | None = None) -> PendingVote:
        """``vote``, started: the caller may work while the ballots travel, and must call
        ``result()`` before its next collective on this group."""
        votes = torch.tensor(ballot, dtype=torch.int64)
        if self.group is None:
            return PendingVote(self, votes, None, what, error)
        try:
            hit("vote")
            if self._side is not None:
                work = self._side.allreduce([votes], _max_options())  # type: ignore[attr-defined]
            elif dist.get_backend(self.group) == "gloo":
                work = dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            else:  # an NCCL group reduces device tensors only
                work = self._gloo_group("reads").allreduce([votes], _max_options())  # type: ignore[attr-defined]
        except (RuntimeError, OSError) as e:
            raise self._vote_failure(e, what, error) from (None if error is not None else e)
        return PendingVote(self, votes, work, what, error)

    def _vote_failure(self, e: BaseException, what: str, error: BaseException | None) -> BaseException:
        """This rank's own failure when it had one (the broken vote is only its echo), else the loss."""
        return _as_checkpoint_error(error, what, self.rank) if error is not None else self._lost(what, e)

    def side_group(self) -> Comm:
        """A separate gloo group for work on background threads: collectives of the training job's
        own group must not run concurrently from another thread. Collective to create.

        One per job group, kept as long as that group lives and reused by every later saver.
        Its rendezvous keys live under a prefix that rank 0 draws at random and shares over the
        job group, so they can never meet keys an earlier attempt left in the same store: under
        torchrun, whose store outlives a restart, a group named as ``new_group`` names it (the same
        name in every attempt) can read the dead attempt's addresses and fail or hang."""
        if self.group is None or self._side is not None:
            return self
        return Comm(self.group, side=self._gloo_group("side"))


    def exchange(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], what: str) -> torch.Tensor:
        """All-to-all of CPU bytes: ``send`` holds ``send_sizes[r]`` bytes for each rank r in rank
        order; returns the ``recv_sizes[r]`` bytes from each rank r, concatenated in rank order.

        Runs over the side group on a side Comm, else over the job group when it is a gloo group,
        else over a gloo group of shardckpt's own (an NCCL group cannot move CPU tensors), created
        once per job group. Collective."""
        recv = torch.empty(sum(recv_sizes), dtype=torch.uint8)
        if self.group is None:
            recv.copy_(send)
            return recv
        try:
            if self._side is not None:  # on a background thread: never the job group
                self._side.alltoall_base(recv, send, recv_sizes, send_sizes).wait()  # type: ignore[attr-defined]
            elif dist.get_backend(self.group) == "gloo":
                dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
            else:
                gloo = self._gloo_group("reads")
                gloo.alltoall_base(recv, send, recv_sizes, send_sizes).wait()  # type: ignore[attr-defined]
        except (RuntimeError, OSError) as e:
            raise self._lost(what, e) from e
        return recv

    def _gloo_group(self, purpose: str) -> dist.ProcessGroupGloo:
        """A gloo group over the job group's ranks for ``purpose`` ("side": background gathers;
        "reads": read_once's exchange and the save vote in an NCCL job), created once per job group (collective the
        first time) under a fresh random key prefix (see ``side_group``)."""
        assert self.group is not None
        key = (id(self.group), purpose)
        cached = _GLOO_GROUPS.get(key)
        if cached is not None and cached[0] is self.group and _registered(self.group):
            return cached[1]
        _forget_destroyed_groups()
        nonce = self.all_gather(secrets.token_hex(8) if self.rank == 0 else None, f"creating the {purpose} group")[0]
        store = dist.PrefixStore(f"shardckpt/{purpose}/{nonce}/", c10d._get_process_group_store(self.group))
        try:
            gloo = dist.ProcessGroupGloo(store, self.rank, self.world_size, timedelta(seconds=collective_timeout_seconds()))
        except RuntimeError as e:
            raise CommunicationError(
                f"creating the {purpose} group: rank {self.rank} could not connect to the other ranks ({_first_line(e)})"
            ) from e
        _GLOO_GROUPS[key] = (self.group, gloo)
        return gloo


# Error types that ``Comm.run(typed=True)`` re-raises on the peers of a failed rank: those built
# from a message alone.
_PLAIN_ERRORS: dict[str, type[CheckpointError]] = {
    cls.__name__: cls
    for cls in (CheckpointError, CorruptCheckpointError, IncompleteCheckpointError, IndexFormatError,
                CheckpointIOError, StorageAccessError, StateMismatchError)
}

# (job group id, purpose) -> (job group, a gloo group of shardckpt's own over its ranks); the job
# group is kept so that its id is not reused while the entry lives.
_GLOO_GROUPS: dict[tuple[int, str], tuple[dist.ProcessGroup, dist.ProcessGroupGloo]] = {}


class PendingVote:
    """A vote in flight (``Comm.vote_start``)."""

    def __init__(self, comm: Comm, votes: torch.Tensor, work: dist.Work | None, what: str,
                 error: BaseException | None) -> None:
        self.comm = comm  # the group it runs on
        self._votes, self._work, self._what, self._error = votes, work, what, error
        self._failure: BaseException | None = None

    def result(self) -> list[int]:
        """The reduced ballots; waits for them. A broken collective raises, now and on every later call."""
        work, self._work = self._work, None
        if work is not None:
            try:
                work.wait()
            except (RuntimeError, OSError) as e:
                self._failure = self.comm._vote_failure(e, self._what, self._error)
                raise self._failure from (None if self._error is not None else e)
        if self._failure is not None:
            raise self._failure
        return [int(v) for v in self._votes.tolist()]


def _forget_destroyed_groups() -> None:
    for purpose_key, (group, _gloo) in list(_GLOO_GROUPS.items()):
        if not _registered(group):
            del _GLOO_GROUPS[purpose_key]


def _registered(group: dist.ProcessGroup) -> bool:
    """False once the group was destroyed (by destroy_process_group)."""
    if not dist.is_initialized():
        return False
    try:
        dist.get_process_group_ranks(group)
    except (ValueError, RuntimeError):
        return False
    return True


def _max_options() -> dist.AllreduceOptions:
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX  # type: ignore[assignment]  # the stubs type the field as the enum wrapper
    return opts


def _gather_bytes_to_root(side: dist.ProcessGroupGloo, data: bytes) -> list[bytes] | None:
    """Gather of byte strings to rank 0 of a bare gloo group: the lengths (to every rank, so each
    pads to the same size), then the padded buffers to rank 0 only."""
    world, root = side.size(), side.rank() == 0
    sizes = _all_lengths(side, len(data))
    mine = _padded(data, max(sizes))
    out = [torch.empty(max(sizes), dtype=torch.uint8) for _ in range(world)] if root else []
    opts = dist.GatherOptions()
    opts.rootRank = 0
    side.gather([out] if root else [], [mine], opts).wait()  # type: ignore[attr-defined]  # not in the stubs
    return [bytes(t[:n].numpy()) for t, n in zip(out, sizes)] if root else None


def _all_lengths(side: dist.ProcessGroupGloo, n: int) -> list[int]:
    length = torch.tensor([n], dtype=torch.int64)
    lengths = [torch.empty(1, dtype=torch.int64) for _ in range(side.size())]
    side.allgather([lengths], [length]).wait()  # type: ignore[attr-defined]  # not in the stubs
    return [int(t.item()) for t in lengths]


def _padded(data: bytes, size: int) -> torch.Tensor:
    mine = torch.zeros(size, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return mine


def _gather_bytes(side: dist.ProcessGroupGloo, data: bytes) -> list[bytes]:
    """All-gather of byte strings over a bare gloo group: the lengths, then padded buffers."""
    world = side.size()
    sizes = _all_lengths(side, len(data))
    mine = _padded(data, max(sizes))
    out = [torch.empty(max(sizes), dtype=torch.uint8) for _ in range(world)]
    side.allgather([out], [mine]).wait()  # type: ignore[attr-defined]
    return [bytes(t[:n].numpy()) for t, n in zip(out, sizes)]


_WARNED = False


def warn_if_restarts_share_the_store() -> None:
    """Warn once when torchrun restarts workers over its shared rendezvous store: torch's own
    ``init_process_group`` then may read the previous attempt's addresses after a restart and fail
    or hang (pytorch/pytorch#135712). shardckpt's groups are immune; the job's own group is not."""
    global _WARNED
    if _WARNED or not restarts_share_the_store():
        return
    _WARNED = True
    warnings.warn(
        "torchrun shares its rendezvous store with the workers and may restart them: after a restart, "
        "init_process_group can read the dead attempt's addresses and fail or hang (pytorch/pytorch#135712). "
        "Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment.",
        RuntimeWarning, stacklevel=3,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else repr(e)


def _as_checkpoint_error(error: BaseException, what: str, rank: int) -> BaseException:
    """Every failure a user meets is a CheckpointError: an unexpected one (an OSError from a
    filesystem call outside the storage layer, a bug) is wrapped, naming the phase and the rank.
    BaseExceptions that are not errors (SystemExit, KeyboardInterrupt) pass through as they are."""
    if isinstance(error, CheckpointError) or not isinstance(error, Exception):
        return error
    kind = CheckpointIOError if isinstance(error, OSError) else CheckpointError
    wrapped = kind(f"{what} failed on rank {rank}: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped
