"""The snapshot of a save: the source of each write item this rank holds, copied into staging
buffers (or used in place), and the digests of the replicated tensors it holds with other ranks.
Shared by async_save (the stall) and the blocking save's stream (saving.save_streaming)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shardckpt.flatten import TensorItem
from shardckpt.pipeline.staging import DeviceCopier, StagingPool
from shardckpt.pipeline.writer import StagedWrite, source_view
from shardckpt.planning.save_plan import WriteItem
from shardckpt.replica_digest import HostDigest, replica_digest
from shardckpt.storage.faults import hit

if TYPE_CHECKING:
    from shardckpt.saving import PreparedSave


def _item_for(prep: PreparedSave, w: WriteItem) -> TensorItem:
    """The item holding ``w.box``: a rank holds one box of most tensors, several of a strided
    shard's (their items named ``key\0box<n>``)."""
    name = w.key if w.entry_rank is None else f"{w.key}\0{w.entry_rank}"
    item = prep.items[name]
    if item.box == w.box or item.box.intersect(w.box) == w.box:
        return item
    return next(t for n, t in prep.items.items() if n.startswith(f"{name}\0box") and t.box.intersect(w.box) == w.box)


# Host replicas smaller than this are digested on the snapshot thread, larger ones on the pool.
_POOL_HASH_BYTES = 1 << 20

# Host-to-host snapshot copies go in batches of up to this many bytes (DeviceCopier.copy_host).
_BATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class Source:
    """Where one write item's bytes are read from: a view of the item's local tensor."""

    write: WriteItem
    dtype: str  # the item's dtype name, as the index stores it
    view: torch.Tensor
    device: str  # view.device.type, read once: each .device builds a torch.device
    nbytes: int


def _sources(prep: PreparedSave) -> list[Source]:
    out = []
    for w in prep.agreed.share.writes:
        item = _item_for(prep, w)
        view = item.local if item.box == w.box else source_view(item.local, item.box, w.box)
        out.append(Source(w, item.dtype, view, view.device.type, view.numel() * view.element_size()))
    return out


class SourceViews:
    """The sources of the last save staged with it, and the digests of its small host replicas,
    kept while its plan and items are the same objects (a repeated save of an unchanged state:
    plan_exchange and flatten's memo). Finding each item and its view again cost about 5 us per
    item, a third of a small state's snapshot; making a step count's digest view, 10 us each.
    All are views of the items' own local tensors, so they always show the current bytes.

    The items are held weakly, and the views are dropped once the first item is gone: a model
    the job has let go of (rebuilt after a restart) must not be kept alive by its last save."""

    def __init__(self) -> None:
        self._prep: weakref.ref[PreparedSave] | None = None  # the save they were last checked for
        self._share: object = None
        self._items: list[weakref.ref[TensorItem]] = []
        self._sources: list[Source] = []
        self._digests: dict[str, HostDigest] = {}

    def _check(self, prep: PreparedSave) -> None:
        if self._prep is not None and self._prep() is prep and prep.agreed.share is self._share:
            return  # checked for this save, whose plan has not changed since (settle_vote)
        items = list(prep.items.values())
        same = prep.agreed.share is self._share and len(items) == len(self._items)
        if not (same and all(ref() is item for ref, item in zip(self._items, items))):
            self._drop()
            self._sources = _sources(prep)
            self._share = prep.agreed.share
            self._items = [weakref.ref(item, self._gone) for item in items[:1]]
            self._items += [weakref.ref(item) for item in items[1:]]
        self._prep = weakref.ref(prep)

    def _gone(self, ref: weakref.ref[TensorItem]) -> None:
        if self._items and self._items[0] is ref:  # not a save's items made since
            self._drop()

    def _drop(self) -> None:
        self._share, self._items, self._sources, self._digests, self._prep = None, [], [], {}, None

    def of(self, prep: PreparedSave) -> list[Source]:
        self._check(prep)
        return self._sources

    def digest(self, prep: PreparedSave, key: str) -> str:
        """``replica_digest`` of the contiguous host tensor of item ``key``."""
        self._check(prep)
        made = self._digests.get(key)
        if made is None:
            made = self._digests[key] = HostDigest(prep.items[key].local)
        return made()


def stage(
    prep: PreparedSave,
    staging: StagingPool | None = None,
    copier: DeviceCopier | None = None,
    copy_host: bool = True,
    views: SourceViews | None = None,
) -> Iterator[StagedWrite]:
    """CPU-contiguous bytes for each of this rank's write items.

    With a ``staging`` pool every item is copied into a reused buffer (a snapshot: the caller may
    change its tensors once the items are taken and ``copier`` is synced). Without one, or with
    ``copy_host`` off (the blocking save, which holds the caller), host tensors that are already
    contiguous are used in place. ``views`` keeps the sources across saves of the same plan."""
    copier = copier or DeviceCopier()
    batch: list[StagedWrite] = []
    sources: list[torch.Tensor] = []
    held = 0  # bytes of buffers taken for the batch and not yet handed on

    def flush() -> Iterator[StagedWrite]:
        nonlocal held
        if batch:
            copier.copy_host([sw.data for sw in batch], sources)
            yield from batch
            batch.clear()
            sources.clear()
            held = 0

    for src in views.of(prep) if views is not None else _sources(prep):
        hit("stage")
        # Not detached unless handed on as is: the copies below run without autograd, and a
        # detach per item was a tenth of a small state's snapshot.
        w, view, device = src.write, src.view, src.device
        if (staging is None or not copy_host) and device == "cpu" and view.is_contiguous():
            yield StagedWrite(w, src.dtype, view.detach())
            continue
        if staging is None:
            yield StagedWrite(w, src.dtype, view.detach().to("cpu", copy=True).contiguous())
            continue
        if device != "cpu" or held + src.nbytes > _BATCH_BYTES or (
            staging.budget is not None and held + src.nbytes > staging.budget
        ):
            # Hand the batch on before waiting for more buffers: the pool may only free them once
            # the writers have these.
            yield from flush()
        buf = staging.acquire(view.dtype, tuple(view.shape), pin=device == "cuda")
        if device == "cpu":
            batch.append(StagedWrite(w, src.dtype, buf, None, pooled=True))
            sources.append(view)
            held += src.nbytes
            continue
        ready = copier.copy(buf, view)
        yield StagedWrite(w, src.dtype, buf, ready, pooled=True)
    yield from flush()


def replica_hashes(
    prep: PreparedSave, pool: ThreadPoolExecutor, copier: DeviceCopier | None = None, views: SourceViews | None = None
) -> dict[str, str]:
    """A digest of every plain tensor that other ranks also hold, to catch replicas that differ.

    Host tensors are hashed in place on the pool; device tensors are digested on the device, on
    the copier's stream (ordered after the training stream's queued work), so that no replica is
    copied to the host while the training loop waits (replica_digest.py)."""
    if not prep.check_replicas:
        return {}
    wanted = prep.agreed.share.replicated
    local = {key: prep.items[key].local for key in wanted}
    # Large host replicas are hashed on the pool; small ones (an optimizer's step counts) here,
    # since handing a tensor of a few bytes to a thread costs more than hashing it.
    on_host = [key for key, t in local.items() if t.device.type == "cpu" and t.nbytes >= _POOL_HASH_BYTES]
    out = dict(zip(on_host, pool.map(lambda key: replica_digest(local[key]), on_host)))
    copier = copier or DeviceCopier()
    for key, t in local.items():
        if t.device.type == "cuda":
            with copier.ordered(t.device):
                out[key] = replica_digest(t)
        elif key not in out:
            out[key] = views.digest(prep, key) if views is not None and t.is_contiguous() else replica_digest(t)
    return out
