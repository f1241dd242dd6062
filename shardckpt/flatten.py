"""Walk a state into flat items (save) and the shared helpers the load walk uses.

Keys are the path parts joined with "/" (``model/layers.0.weight``); the index also stores the parts
with their types, so int keys (optimizer state) come back as ints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardckpt.errors import StateMismatchError
from shardckpt.format.schema import PathPart, dtype_name
from shardckpt.format.values import encode_value
from shardckpt.layout import local_view
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


def contains_tensors(value: object) -> bool:
    """Whether a subtree holds anything that is not a plain value (so it must be walked)."""
    if isinstance(value, torch.Tensor | PerRank) or is_stateful(value):
        return True
    if isinstance(value, dict):
        return any(contains_tensors(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(contains_tensors(v) for v in value)
    return False


def check_part(part: object, path: tuple[PathPart, ...]) -> PathPart:
    if isinstance(part, bool) or not isinstance(part, str | int):
        raise StateMismatchError(
            f"state key {part!r} under {join_key(path) or '<root>'!r} must be a str or int, not {type(part).__name__}"
        )
    return part


def flatten_state(state: dict[str, object], rank: int) -> tuple[list[TensorItem], list[ValueItem]]:
    """Flatten ``state`` into tensor and value items, calling ``state_dict()`` on stateful objects."""
    if not isinstance(state, dict):
        raise StateMismatchError(f"state must be a dict, not {type(state).__name__}")
    tensors: list[TensorItem] = []
    values: list[ValueItem] = []
    seen: dict[str, tuple[PathPart, ...]] = {}
    _walk(state, (), False, rank, tensors, values, seen)
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
) -> None:
    key = join_key(path)
    if isinstance(node, PerRank):
        if per_rank:
            raise StateMismatchError(f"PerRank nested inside PerRank at key {key!r}")
        _walk(node.value, path, True, rank, tensors, values, seen)
    elif isinstance(node, torch.Tensor):
        _claim(key, path, seen)
        tensors.append(_tensor_item(node, key, path, per_rank, rank))
    elif is_stateful(node):
        sd = node.state_dict()  # type: ignore[attr-defined]
        if not isinstance(sd, dict):
            raise StateMismatchError(f"state_dict() of {type(node).__name__} at key {key!r} returned a non-dict")
        _walk(sd, path, per_rank, rank, tensors, values, seen)
    elif isinstance(node, dict | list | tuple) and contains_tensors(node) or (not path and isinstance(node, dict)):
        children = node.items() if isinstance(node, dict) else enumerate(node)
        for part, child in children:
            _walk(child, path + (check_part(part, path),), per_rank, rank, tensors, values, seen)
    else:
        _claim(key, path, seen)
        values.append(ValueItem(key, path, encode_value(node, key), per_rank))


def _tensor_item(tensor: torch.Tensor, key: str, path: tuple[PathPart, ...], per_rank: bool, rank: int) -> TensorItem:
    name = dtype_name(tensor.dtype)
    if name is None:
        raise StateMismatchError(f"tensor {key!r} on rank {rank} has unsupported dtype {tensor.dtype}")
    if per_rank:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        shape = tuple(local.shape)
        return TensorItem(key, path, name, shape, Box.full(shape), local, True, True)
    shape, box, local = local_view(tensor, key, rank)
    return TensorItem(key, path, name, shape, box, local, False, local is tensor)
