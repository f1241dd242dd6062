"""The only importer of torch.distributed. Collectives here carry failures: each rank contributes
either its result or its error, and when any rank failed every rank raises, so one rank's bad input
never leaves the others hanging in the next collective."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

from shardckpt.errors import CheckpointError, CheckpointIOError, CommunicationError, RankFailedError
from shardckpt.options import collective_timeout_seconds
from shardckpt.storage.faults import hit

log = logging.getLogger(__name__)
T = TypeVar("T")


class Comm:
    """A process group seen as (rank, world size, failure-aware gather)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
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
            dist.all_gather_object(out, text, group=self.group)
        except (RuntimeError, OSError) as e:  # gloo/NCCL failures are RuntimeError subclasses
            raise CommunicationError(
                f"{what}: rank {self.rank} lost contact with the other ranks of its group ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}); a peer process died or the network failed"
            ) from e
        return [json.loads(s) for s in out if s is not None]

    def run(self, what: str, fn: Callable[[], tuple[T, object]]) -> tuple[T, list[object]]:
        """Run ``fn`` locally, then gather its JSON-able payload from every rank.

        ``fn`` returns (local result, payload). If it raised on any rank, that rank re-raises its own
        error and the ranks that succeeded raise ``RankFailedError`` naming the failed ranks, so no
        rank goes on into a collective that the failed one will never join.
        """
        error: BaseException | None = None
        local: T | None = None
        payload: object = None
        try:
            local, payload = fn()
        except BaseException as e:  # noqa: BLE001 - every failure (SystemExit too) must reach the gather, or peers hang
            error = e
        mine = {"ok": payload} if error is None else {"error": f"{type(error).__name__}: {error}"}
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
            raise RankFailedError(f"{what} failed on rank(s) {sorted(failures)}: {detail}", failures)
        return local, [g["ok"] for g in gathered if isinstance(g, dict)]  # type: ignore[return-value]

    def side_group(self) -> Comm:
        """A separate gloo group for work on background threads: collectives of the training job's
        own group must not run concurrently from another thread. Collective to create.

        One per job group, kept as long as that group lives and reused by every later saver: a
        group created over the same ranks gets the same rendezvous name, and a re-created one
        would read its destroyed predecessor's addresses. ``destroy_process_group()`` frees it."""
        if self.group is None:
            return self
        cached = _SIDE_GROUPS.get(id(self.group))
        if cached is not None and cached[0] is self.group and _registered(cached[1]):
            return Comm(cached[1])
        ranks = dist.get_process_group_ranks(self.group)
        # Local synchronization: only the members create it, so saving over a subgroup does not
        # need ranks outside it to take part (they would never call async_save for it).
        side = dist.new_group(
            ranks=ranks, backend="gloo", timeout=timedelta(seconds=collective_timeout_seconds()),
            use_local_synchronization=True,
        )
        _SIDE_GROUPS[id(self.group)] = (self.group, side)
        return Comm(side)


_SIDE_GROUPS: dict[int, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def _registered(group: dist.ProcessGroup) -> bool:
    """False once the group was destroyed (with the job's group, by destroy_process_group)."""
    try:
        dist.get_process_group_ranks(group)
    except (ValueError, RuntimeError):
        return False
    return dist.is_initialized()


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
