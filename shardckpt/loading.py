"""Match a target state against the index: which tensors to fill from which blocks, which values to
replace, which stateful objects to hand their filled state_dict back to."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardckpt.errors import StateMismatchError
from shardckpt.flatten import (
    MAX_NESTING,
    PerRank,
    check_depth,
    check_part,
    contains_tensors,
    is_stateful,
    join_key,
    tied_names,
    unstorable,
)
from shardckpt.format.schema import CheckpointIndex, PathPart, TensorEntry, ValueEntry, dtype_name
from shardckpt.format.values import decode_value
from shardckpt.layout import local_layout
from shardckpt.module_state import OptimizerRoute, route_modules
from shardckpt.optim_prefill import SavedState, prefill
from shardckpt.pipeline.reader import ReadRequest
from shardckpt.planning.boxes import Box
from shardckpt.planning.load_plan import plan_reads
from shardckpt.planning.shards import LocalPart

_Tree = dict[str, "_Tree"]  # a path part -> the parts that follow it in some saved path


@dataclass
class LoadWalk:
    index: CheckpointIndex
    rank: int
    where: str
    requests: list[ReadRequest] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    statefuls: list[tuple[object, dict[str, object]]] = field(default_factory=list)
    consumed: set[tuple[str, int | None]] = field(default_factory=set)
    routes: dict[int, object] = field(default_factory=dict)
    # load(dtype_cast=True): a floating-point tensor may fill a target of another floating dtype.
    dtype_cast: bool = False
    # Optimizers given their state from the checkpoint's layout (optim_prefill.py), to be reset
    # if the load fails: their state is uninitialized until the read fills it.
    prefilled: list[torch.optim.Optimizer] = field(default_factory=list)
    # While filling a module's state: the keys of its tied parameters' second names.
    _tied: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self.tensors: dict[tuple[str, int | None], TensorEntry] = {(t.key, t.rank): t for t in self.index.tensors}
        self.values: dict[tuple[str, int | None], ValueEntry] = {(v.key, v.rank): v for v in self.index.values}
        # The entries' paths as a tree of their parts (as strings), so that which paths lead to
        # saved entries is known in memory linear in the index: a set of every prefix of every
        # path grows with the square of the path's length (558 MiB for an audit's 3 MB index).
        self._inner: _Tree = {}
        entries: tuple[TensorEntry | ValueEntry, ...] = (*self.index.tensors, *self.index.values)
        for entry in entries:
            node = self._inner
            for part in entry.path[:-1]:
                node = node.setdefault(str(part), {})

    def leads_to_entries(self, path: tuple[PathPart, ...]) -> bool:
        """Whether ``path`` is a proper, non-empty prefix of some saved entry's path."""
        node = self._inner
        for part in path:
            child = node.get(str(part))
            if child is None:
                return False
            node = child
        return bool(path)

    def fill_root(self, state: dict[str, object]) -> None:
        if not isinstance(state, dict):
            raise StateMismatchError(f"state must be a dict, not {type(state).__name__}")
        # Modules and optimizers go through torch's distributed state-dict helpers (module_state.py).
        self.routes = route_modules(state, self.leads_to_entries)
        for part, child in list(state.items()):
            state[part] = self.fill(child, (check_part(part, ()),), False)

    def fill(self, node: object, path: tuple[PathPart, ...], per_rank: bool, optional: bool = False) -> object:
        check_depth(path)
        key = join_key(path)
        ident = (key, self.rank if per_rank else None)
        if isinstance(node, PerRank):
            before = len(self.consumed)
            value = self.fill(node.value, path, True, node.optional)
            return PerRank(value, optional=node.optional, restored=len(self.consumed) > before)
        if isinstance(node, torch.Tensor):
            self._fill_tensor(node, key, ident, optional)
            return node
        if is_stateful(node):
            target = self.routes.get(id(node), node)
            self._prefill(target, path, per_rank)
            template = self._template(target, path)
            if not isinstance(template, dict):
                raise StateMismatchError(f"state_dict() of {type(node).__name__} at {key!r} returned a non-dict")
            # A module's tied parameters were saved once, under the first name (flatten.py).
            ties = tied_names(node) if isinstance(node, torch.nn.Module) else {}
            ties = {later: first for later, first in ties.items() if first in template}
            outer = self._tied
            self._tied = outer | {f"{key}/{later}" for later in ties}
            try:
                filled = self.fill(template, path, per_rank, optional)
            finally:
                self._tied = outer
            assert isinstance(filled, dict)
            for later, first in ties.items():
                if (f"{key}/{later}", ident[1]) not in self.tensors:
                    filled[later] = filled[first]  # restored through the tie: the same tensor
            self._materialize(filled, path, per_rank)
            self.statefuls.append((target, filled))
            return node
        value = self.values.get(ident)
        if value is not None and not contains_tensors(node, key):
            self.consumed.add(ident)
            return self._reconcile(node, decode_value(value.value, f"{self.where}: value {key!r}"), key, optional)
        if isinstance(node, dict):
            for part, child in list(node.items()):
                node[part] = self.fill(child, path + (check_part(part, path),), per_rank, optional)
            return node
        if isinstance(node, list | tuple):
            items = [self.fill(child, path + (i,), per_rank, optional) for i, child in enumerate(node)]
            if isinstance(node, list):
                node[:] = items
                return node
            return tuple(items)
        if not self.leads_to_entries(path) and not optional:
            self.missing.append(key)
        return node

    def _reconcile(self, template: object, saved: object, key: str, optional: bool) -> object:
        """The saved value replaces the target's, but keys of a target dict that the saved dict
        lacks are not dropped silently: ``load_state_dict`` would meet them as a raw ``KeyError``
        (a scheduler's ``lr_lambdas``), or worse, not at all. They are missing keys (with
        ``strict=False`` the target's entry stays), except where the target holds nothing there
        (``{}``, ``[{}]``): there is nothing to load into it, and DCP, for one, never records such
        entries."""
        if isinstance(template, dict) and isinstance(saved, dict):
            for part, child in template.items():
                sub = f"{key}/{part}"
                if part in saved:
                    saved[part] = self._reconcile(child, saved[part], sub, optional)
                    continue
                if not optional and not _holds_nothing(child):
                    self.missing.append(sub)
                saved[part] = child  # strict=False: left as the target had it, like a missing tensor
        elif isinstance(template, list | tuple) and isinstance(saved, list) and len(template) == len(saved):
            for i, child in enumerate(template):
                saved[i] = self._reconcile(child, saved[i], f"{key}/{i}", optional)
        elif isinstance(template, list | tuple) and isinstance(saved, tuple) and len(template) == len(saved):
            return tuple(self._reconcile(t, s, f"{key}/{i}", optional) for i, (t, s) in enumerate(zip(template, saved)))
        return saved

    def _fill_tensor(self, tensor: torch.Tensor, key: str, ident: tuple[str, int | None], optional: bool) -> None:
        entry = self.tensors.get(ident)
        if entry is None:
            if key in self._tied:
                return  # a tied parameter's second name: filled through the first (fill)
            if not optional:
                self.missing.append(key if ident[1] is None else f"{key} (rank {ident[1]})")
            return
        self.consumed.add(ident)
        self._check_target(tensor, key)
        if ident[1] is not None:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            shape = tuple(local.shape)
            full = Box.full(shape)
            parts = [LocalPart(full, full)] if full.volume else []
        else:
            shape, parts, local = local_layout(tensor, key, self.rank)
        self._check_target(local, key)  # a DTensor's local shard
        castable = self.dtype_cast and local.dtype.is_floating_point and entry.torch_dtype.is_floating_point
        if (dtype_name(local.dtype) != entry.dtype and not castable) or shape != entry.shape:
            hint = ("; pass dtype_cast=True to cast floating-point tensors" if shape == entry.shape
                    and local.dtype.is_floating_point and entry.torch_dtype.is_floating_point else "")
            raise StateMismatchError(
                f"{self.where}: tensor {key!r} on rank {self.rank}: the checkpoint holds {entry.dtype}"
                f"{list(entry.shape)}, the target is {dtype_name(local.dtype) or local.dtype}{list(shape)}{hint}"
            )
        whole = Box.full(tuple(local.shape))
        for part in parts:
            # A strided shard holds several boxes of the global tensor: each is read into its own
            # slice of the local tensor (a view), so only the blocks that overlap it are read.
            target = local if part.local == whole else local[part.local.slices_within(whole)]
            self.requests.append(ReadRequest(entry, part.box, target, plan_reads(entry, part.box, self.where)))

    def _template(self, target: object, path: tuple[PathPart, ...]) -> object:
        from shardckpt.training import ModelOptimizerState

        if isinstance(target, ModelOptimizerState):
            # Saved before the optimizer's first step: no state to give it (see state_dict).
            return target.state_dict(initialize=self.leads_to_entries((*path, "optim", "state")))
        return target.state_dict()  # type: ignore[attr-defined]

    def _prefill(self, target: object, path: tuple[PathPart, ...], per_rank: bool) -> None:
        """A fresh optimizer gets its state from the checkpoint's layout, not from torch's
        initializing step (optim_prefill.py)."""
        from shardckpt.training import ModelOptimizerState

        if isinstance(target, OptimizerRoute):
            model, optimizer, prefix = target.model, target.optimizer, path
        elif isinstance(target, ModelOptimizerState) and target.optimizer is not None:
            model, optimizer, prefix = target.model, target.optimizer, (*path, "optim")
        else:
            return
        if not optimizer.state and prefill(model, optimizer, self._saved_state((*prefix, "state"), per_rank), self.where):
            self.prefilled.append(optimizer)

    def _saved_state(self, prefix: tuple[PathPart, ...], per_rank: bool) -> SavedState:
        """The entries at ``prefix/<parameter>/<name>``; empty if any lies deeper or shallower."""
        want = tuple(str(p) for p in prefix)
        rank = self.rank if per_rank else None
        out: dict[str, dict[str, TensorEntry | ValueEntry]] = {}
        entries: tuple[TensorEntry | ValueEntry, ...] = (*self.index.tensors, *self.index.values)
        for entry in entries:
            if entry.rank != rank or tuple(str(p) for p in entry.path[: len(want)]) != want:
                continue
            if len(entry.path) != len(want) + 2:
                return {}
            out.setdefault(str(entry.path[-2]), {})[str(entry.path[-1])] = entry
        return out

    def undo_prefill(self) -> None:
        """After a failed load: the prefilled optimizers go back to having no state."""
        for optimizer in self.prefilled:
            optimizer.state.clear()
        self.prefilled.clear()

    def _check_target(self, tensor: torch.Tensor, key: str) -> None:
        # A meta target would "load" without error and hold nothing: copies into it do nothing.
        reason = unstorable(tensor)
        if reason is not None:
            raise StateMismatchError(f"{self.where}: cannot load tensor {key!r} on rank {self.rank} into {reason}")

    def _materialize(self, filled: dict[str, object], prefix: tuple[PathPart, ...], per_rank: bool) -> None:
        """Entries saved under a stateful object that its current state_dict lacks (a fresh
        optimizer has no state yet) are created from the checkpoint, as full local tensors."""
        want_rank = self.rank if per_rank else None
        n = len(prefix)
        entries: tuple[TensorEntry | ValueEntry, ...] = (*self.index.tensors, *self.index.values)
        for entry in entries:
            ident = (entry.key, entry.rank)
            if entry.rank != want_rank or ident in self.consumed or len(entry.path) <= n:
                continue
            if tuple(str(p) for p in entry.path[:n]) != tuple(str(p) for p in prefix):
                continue
            self.consumed.add(ident)
            if isinstance(entry, TensorEntry):
                full = Box.full(entry.shape)
                if full.volume:
                    # Memory comes later: execute_reads sizes the tensor once check_files has seen
                    # that the data files hold the bytes the index claims (which bound its shape).
                    tensor = torch.empty(0, dtype=entry.torch_dtype)
                    self.requests.append(ReadRequest(entry, full, tensor, plan_reads(entry, full, self.where), True))
                else:
                    tensor = torch.empty(entry.shape, dtype=entry.torch_dtype)  # no elements, no memory
                value: object = tensor
            else:
                value = decode_value(entry.value, f"{self.where}: value {entry.key!r}")
            _insert(filled, entry.path[n:], PerRank(value) if per_rank else value, entry.key, self.where)


def _holds_nothing(node: object, depth: int = 0) -> bool:
    """Whether ``node`` is containers all the way down, with no value in them (``{}``, ``[{}]``).
    A target that nests deeper than any saveable state (or contains itself) does not qualify."""
    if depth > MAX_NESTING or not isinstance(node, dict | list | tuple):
        return False
    return all(_holds_nothing(child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def _insert(root: dict[str, object], parts: tuple[PathPart, ...], value: object, key: str, where: str) -> None:
    node: object = root
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, dict):
            if last:
                node[part] = value
            else:
                # Missing containers are created as dicts: int keys (optimizer state) are far more
                # common than lists that a state_dict leaves out.
                node = node.setdefault(part, {})
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part <= len(node):
            if part == len(node):
                node.append(value if last else {})
            elif last:
                node[part] = value
            node = node[part]
        else:
            raise StateMismatchError(f"{where}: cannot place checkpoint key {key!r} into the target state")
