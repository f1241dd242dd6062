"""Walk a state into flat items (save) and the shared helpers the load walk uses.

Keys are the path parts joined with "/" (``model/layers.0.weight``); the index also stores the parts
with their types, so int keys (optimizer state) come back as ints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shardckpt.errors import StateMismatchError
from shardckpt.format.schema import MAX_PATH_PARTS, PathPart, dtype_name, path_part_problem
from shardckpt.format.values import MAX_VALUE_DEPTH, encode_value
from shardckpt.layout import local_pieces
from shardckpt.planning.boxes import Box


class PerRank:
    """Marks a value as belonging to the calling rank: each rank's value is stored separately and
    comes back to the same rank on load. Use it for values that legitimately differ across ranks
    (RNG state, a rank's data position). Plain tensors and values that are *not* wrapped must be
    equal on every rank; save raises ``ReplicaMismatchError`` otherwise, never keeps one silently.
    """

    __slots__ = ("optional", "restored", "value")

    def __init__(self, value: object, *, optional: bool = False, restored: bool | None = None) -> None:
        self.value = value
        # optional: a rank with no saved value (the world grew) keeps ``value`` instead of raising.
        self.optional = optional
        # Set by load: whether this rank's value came from the checkpoint.
        self.restored = restored

    def __repr__(self) -> str:
        return f"PerRank({self.value!r}{', optional=True' if self.optional else ''})"


@dataclass
class TensorItem:
    key: str
    path: tuple[PathPart, ...]
    dtype: str
    shape: tuple[int, ...]
    box: Box
    local: torch.Tensor
    per_rank: bool
    plain: bool  # a plain tensor (replicated by assumption), as opposed to a DTensor
    # The DTensor ``local`` is a shard of (None for a plain tensor). An in-place write through a
    # DTensor bumps its own version counter, not its local tensor's: lazy mode watches both.
    source: torch.Tensor | None = None

    def meta(self) -> list[object]:
        return [self.key, list(self.path), self.dtype, list(self.shape), list(self.box.offsets),
                list(self.box.sizes), self.per_rank, self.plain]


@dataclass
class ValueItem:
    key: str
    path: tuple[PathPart, ...]
    value: object  # already encoded as typed JSON
    per_rank: bool


def is_stateful(value: object) -> bool:
    return (
        not isinstance(value, dict | list | tuple | torch.Tensor)
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


def join_key(path: tuple[PathPart, ...]) -> str:
    return "/".join(str(p) for p in path)


# Below this many levels, a subtree can be neither walked (its path would pass MAX_PATH_PARTS) nor
# stored as one value (deeper than MAX_VALUE_DEPTH): no saveable state or load target nests deeper.
MAX_NESTING = MAX_PATH_PARTS + MAX_VALUE_DEPTH


def _shown_key(key: str) -> str:
    """``key`` for an error message: a key hundreds of levels deep is cut, not pasted whole."""
    return key if len(key) <= 200 else f"{key[:200]}..."


def contains_tensors(value: object, key: str = "") -> bool:
    """Whether a subtree holds anything that is not a plain value (so it must be walked).

    Iterative and visiting each container once, so a deep or self-referencing state reaches the
    checks that name its key instead of exhausting the stack or looping; ``key`` names the subtree
    when it nests deeper than ``MAX_NESTING``."""
    stack: list[tuple[object, int]] = [(value, 0)]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if isinstance(node, torch.Tensor | PerRank) or is_stateful(node):
            return True
        if isinstance(node, dict | list | tuple) and id(node) not in seen:
            if depth >= MAX_NESTING:
                raise StateMismatchError(f"state under key {_shown_key(key)!r} is nested deeper than {MAX_NESTING} levels")
            seen.add(id(node))
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def check_part(part: object, path: tuple[PathPart, ...]) -> PathPart:
    problem = path_part_problem(part)
    if problem is None and isinstance(part, str | int):
        return part
    # An int is not shown: formatting one of over 4300 digits raises.
    shown = "" if isinstance(part, int) and not isinstance(part, bool) else f"{_shown_key(repr(part))} "
    raise StateMismatchError(f"state key {shown}under {_shown_key(join_key(path)) or '<root>'!r} {problem}; use another key")


def check_depth(path: tuple[PathPart, ...]) -> None:
    """Paths hold at most MAX_PATH_PARTS parts; a state that goes deeper (or contains itself
    along a path of tensors) is refused before the walk exhausts the stack."""
    if len(path) > MAX_PATH_PARTS:
        raise StateMismatchError(
            f"state key {_shown_key(join_key(path))!r} is nested deeper than {MAX_PATH_PARTS} levels (does a "
            "container hold itself?)"
        )


def unstorable(tensor: torch.Tensor) -> str | None:
    """Why the bytes of ``tensor`` cannot be saved or loaded into as one dense box, or None."""
    if tensor.is_nested:
        return "a nested tensor; save its components (unbind()) or a padded copy (to_padded_tensor())"
    if tensor.layout != torch.strided:
        return f"a sparse tensor ({tensor.layout}); use to_dense()"
    if tensor.is_meta:
        return "a meta tensor, which holds no data; materialize it first (e.g. module.to_empty(device=...))"
    if tensor.is_conj():
        return "a conjugate view; call resolve_conj() first"
    return None


def tied_names(module: torch.nn.Module) -> dict[str, str]:
    """The state-dict names of ``module`` that name a parameter or buffer already named earlier
    (an LM head tied to the embedding), each mapped to that first name.

    Found from the module's structure, not from tensor memory, so every rank agrees even where
    its shard of the tied parameter is empty. Names are the ones ``get_model_state_dict`` uses
    (DDP's ``module.`` and ``torch.compile``'s prefixes dropped)."""
    from torch.distributed.checkpoint.state_dict import _get_fqns  # the names get_model_state_dict gives

    first: dict[int, str] = {}
    out: dict[str, str] = {}
    named = (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        for fqn in sorted(_get_fqns(module, name)):
            known = first.setdefault(id(tensor), fqn)
            if known != fqn:
                out.setdefault(fqn, known)
    return out


def flatten_state(state: dict[str, object], rank: int) -> tuple[list[TensorItem], list[ValueItem]]:
    """Flatten ``state`` into tensor and value items, calling ``state_dict()`` on stateful objects."""
    if not isinstance(state, dict):
        raise StateMismatchError(f"state must be a dict, not {type(state).__name__}")
    from shardckpt.module_state import route_modules  # it builds on this module's walk helpers

    tensors: list[TensorItem] = []
    values: list[ValueItem] = []
    seen: dict[str, tuple[PathPart, ...]] = {}
    # Without autograd, DTensor.to_local() hands back the local shard instead of running an
    # autograd Function per tensor: a fifth of flattening, and nothing here needs gradients.
    with torch.no_grad():
        _walk(state, (), False, rank, tensors, values, seen, route_modules(state))
    return tensors, values


def _claim(key: str, path: tuple[PathPart, ...], seen: dict[str, tuple[PathPart, ...]]) -> None:
    if key in seen:
        raise StateMismatchError(f"state paths {list(seen[key])} and {list(path)} both map to key {key!r}")
    seen[key] = path


def _walk(
    node: object,
    path: tuple[PathPart, ...],
    per_rank: bool,
    rank: int,
    tensors: list[TensorItem],
    values: list[ValueItem],
    seen: dict[str, tuple[PathPart, ...]],
    routes: Mapping[int, object],
    tied: Mapping[str, str] | None = None,
    memo: ItemMemo | None = None,
) -> None:
    check_depth(path)
    key = join_key(path)
    if isinstance(node, PerRank):
        if per_rank:
            raise StateMismatchError(f"PerRank nested inside PerRank at key {key!r}")
        _walk(node.value, path, True, rank, tensors, values, seen, routes, tied, memo)
    elif isinstance(node, torch.Tensor):
        _claim(key, path, seen)
        if tied is not None and key in tied:
            return  # a tied parameter's second name: its data is saved under the first
        tensors.extend(_tensor_items(node, key, path, per_rank, rank) if memo is None
                       else _remembered_items(memo, node, key, path, per_rank, rank))
    elif is_stateful(node):
        # Modules and optimizers go through torch's distributed state-dict helpers (module_state.py).
        obj = routes.get(id(node), node)
        # ModelOptimizerState lists the leaves of an answer it remembers: no dicts to walk.
        kept: FlattenMemo | None = getattr(obj, "flatten_memo", None)
        leaves = getattr(obj, "leaves_for_save", None)
        if kept is not None and leaves is not None and not isinstance(node, torch.nn.Module):
            found = leaves()
            if found is not None:
                _add_leaves(found, path, per_rank, rank, tensors, values, seen, kept)
                return
        # ModelOptimizerState gives the tensors undetached and skips get_state_dict when it can.
        state_dict = getattr(obj, "state_dict_for_save", None) or obj.state_dict  # type: ignore[attr-defined]
        sd = state_dict()
        if not isinstance(sd, dict):
            raise StateMismatchError(f"state_dict() of {type(node).__name__} at key {key!r} returned a non-dict")
        # A module's tied parameters (an LM head tied to the embedding) are saved once, under the
        # first name; load restores the others through the tie (loading.py). Only modules: a plain
        # dict naming one tensor twice may be loaded into two separate tensors, so both are kept.
        if isinstance(node, torch.nn.Module):
            tied = {f"{key}/{later}": f"{key}/{first}" for later, first in tied_names(node).items() if first in sd}
        kept = getattr(obj, "flatten_memo", None)  # asked again: the answer may have learned anew
        _walk(sd, path, per_rank, rank, tensors, values, seen, routes, tied, kept.items if kept is not None else None)
    elif (not path and isinstance(node, dict)) or (isinstance(node, dict | list | tuple) and contains_tensors(node, key)):
        children = node.items() if isinstance(node, dict) else enumerate(node)
        for part, child in children:
            _walk(child, path + (check_part(part, path),), per_rank, rank, tensors, values, seen, routes, tied, memo)
    else:
        _claim(key, path, seen)
        values.append(ValueItem(key, path, encode_value(node, key), per_rank))


# Per key: (tensor, where its bytes are, per_rank, rank, path, the items made of it).
ItemMemo = dict[str, tuple[torch.Tensor, tuple[object, ...], bool, int, tuple[PathPart, ...], list[TensorItem]]]

Parts = tuple[PathPart, ...]


class FlattenMemo:
    """What flatten keeps between saves of one stateful object while its structure is unchanged
    (ModelOptimizerState's recipe): the items of each tensor, and the checked path and key of
    each leaf it lists (``leaves_for_save``), by (the object's path, the leaf's path under it)."""

    __slots__ = ("items", "paths")

    def __init__(self) -> None:
        self.items: ItemMemo = {}
        self.paths: dict[tuple[Parts, Parts], tuple[Parts, str]] = {}


def _add_leaves(
    leaves: list[tuple[Parts, object]],
    path: Parts,
    per_rank: bool,
    rank: int,
    tensors: list[TensorItem],
    values: list[ValueItem],
    seen: dict[str, Parts],
    memo: FlattenMemo,
) -> None:
    """What ``_walk`` gives for a dict of these leaves (a tensor or a value without tensors at
    each path under ``path``), without visiting the dicts: for a model and its optimizer, the
    walk over about one dict per parameter cost as much as the tensors themselves."""
    for rel, leaf in leaves:
        known = memo.paths.get((path, rel))
        if known is None:
            full = path
            for part in rel:
                full = full + (check_part(part, full),)
                check_depth(full)
            known = memo.paths[(path, rel)] = (full, join_key(full))
        full, key = known
        _claim(key, full, seen)
        if isinstance(leaf, torch.Tensor):
            tensors.extend(_remembered_items(memo.items, leaf, key, full, per_rank, rank))
        else:
            values.append(ValueItem(key, full, encode_value(leaf, key), per_rank))


def data_place(tensor: torch.Tensor) -> tuple[object, ...]:
    """Everything a tensor's items depend on: its local data's place and layout, and placements
    (equal for a parameter and its ``detach()``).
    Any in-place change of what the items' views show (``.data =``, ``set_``) moves data_ptr: the
    remembered views keep the old storage alive, so no new one can take its address. (Not the
    local tensor's id: a parameter's ``to_local()`` is a new alias on every call.)"""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return (
        local.data_ptr(), local.shape, local.stride(), local.storage_offset(), local.dtype, local.device,
        tensor.shape, getattr(tensor, "placements", None), id(getattr(tensor, "device_mesh", None)),
    )


def _remembered_items(
    memo: ItemMemo, tensor: torch.Tensor, key: str, path: tuple[PathPart, ...], per_rank: bool, rank: int
) -> list[TensorItem]:
    """``_tensor_items``, reused when the same tensor object comes back unchanged under the same
    key: a stateful object that hands out its live tensors (ModelOptimizerState) keeps ``memo``,
    so a repeated save of a model skips the layout math for each of its tensors."""
    where = data_place(tensor)
    known = memo.get(key)
    if known is not None and known[0] is tensor and known[1:5] == (where, per_rank, rank, path):
        return known[5]
    items = _tensor_items(tensor, key, path, per_rank, rank)
    memo[key] = (tensor, where, per_rank, rank, path, items)
    return items


def _tensor_items(
    tensor: torch.Tensor, key: str, path: tuple[PathPart, ...], per_rank: bool, rank: int
) -> list[TensorItem]:
    """One item per box of the global tensor that this rank holds (several for a strided shard)."""
    _check_storable(tensor, key, rank)
    name = dtype_name(tensor.dtype)
    if name is None:
        raise StateMismatchError(f"tensor {key!r} on rank {rank} has unsupported dtype {tensor.dtype}")
    if per_rank:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        _check_storable(local, key, rank)
        shape = tuple(local.shape)
        return [TensorItem(key, path, name, shape, Box.full(shape), local, True, True, None if local is tensor else tensor)]
    shape, pieces, local = local_pieces(tensor, key, rank)
    _check_storable(local, key, rank)  # a DTensor's local shard
    source = None if local is tensor else tensor
    return [TensorItem(key, path, name, shape, box, view, False, local is tensor, source) for box, view in pieces]


def _check_storable(tensor: torch.Tensor, key: str, rank: int) -> None:
    reason = unstorable(tensor)
    if reason is not None:
        raise StateMismatchError(f"tensor {key!r} on rank {rank} is {reason}")
