"""Read a torch.distributed.checkpoint (DCP) directory for migration: the whole state, gathered in
this process, with the nesting it was saved with.

DCP flattens a state into dotted keys and records, per key, the path it came from
(``metadata.planner_data``). Two details of that flattening decide how the state is rebuilt:

- Dict keys are recorded as ``str(key)``; only list positions are ints. So an int part of a path is
  a list index, never a dict key, and the containers above it are lists (``param_groups``).
- A dict with no leaves under it (``{}``, ``[{}]``) is not recorded at all, nor is a list element
  that holds nothing. A missing list element is rebuilt as ``{}``; a missing dict key cannot be
  seen here, and ``shardckpt.load`` keeps the target's own empty entry for it (as DCP's load does).

``torch.optim`` state dicts key their state by int parameter ids, which DCP turned into strings;
where a ``{"state", "param_groups"}`` dict names exactly those ids in its ``params`` lists, the ids
are made ints again so ``Optimizer.load_state_dict`` finds them. (State dicts from
``get_state_dict`` key by parameter name and are kept as they are.)

DCP pickles its metadata and every non-tensor value, and reading them runs the unpickler with
``weights_only=False``: only migrate checkpoints you trust.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings

import torch

from shardckpt.errors import CheckpointNotFoundError, CorruptCheckpointError

log = logging.getLogger(__name__)

Part = str | int
# List positions missing from a DCP checkpoint are rebuilt as {} (see above); more than this many
# in one checkpoint is not a state any job saved but a damaged index.
MAX_MISSING_ELEMENTS = 1 << 20


class _Node(dict[Part, object]):
    """A container being rebuilt; told apart from dict values that DCP stored whole."""


def read_dcp(path: str | os.PathLike[str]) -> dict[str, object]:
    """Every tensor and value of the DCP checkpoint at ``path``, as full CPU tensors in one process.

    Example::

        state = read_dcp("dcp_ckpt/step-100")           # {"model": {...}, "optim": {...}, ...}
        shardckpt.save(state, "ckpt/step-100")
    """
    where = str(path)
    flat, paths = _load_flat(where)
    root = _Node()
    for fqn, value in flat.items():
        _place(root, paths[fqn], value, where)
    missing: list[str] = []
    state = _finish(root, (), where, missing)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{where}: the DCP checkpoint's top-level keys are list positions, not names")
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        log.warning("%s: DCP recorded nothing for list element(s) %s (it drops empty dicts); rebuilt as {}", where, shown)
    _restore_optimizer_ids(state)
    return state


def _load_flat(where: str) -> tuple[dict[str, object], dict[str, tuple[Part, ...]]]:
    """DCP's own flat view: dotted key -> value, and dotted key -> the path it was saved from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(where).read_metadata()
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{where}: no DCP checkpoint here (no readable .metadata): {e}") from e
    except (OSError, ValueError, EOFError, AttributeError, pickle.UnpicklingError) as e:
        raise CorruptCheckpointError(f"{where}: not a readable DCP checkpoint: {type(e).__name__}: {e}") from e
    recorded = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    flat: dict[str, object] = {}
    paths: dict[str, tuple[Part, ...]] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        paths[fqn] = _checked_path(recorded.get(fqn, (fqn,)), fqn, where)
        if isinstance(meta, TensorStorageMetadata):
            flat[fqn] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        else:
            flat[fqn] = None  # a pickled object: DCP fills it in
    # Flat keys, read as they are: DCP's own unflattening would write str(key) where the state
    # had an int, and rebuild lists as dicts. dcp.load puts each value it read back into ``flat``.
    planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(flat, checkpoint_id=where, planner=planner, no_dist=True)
    except (CheckpointException, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        # CheckpointException derives from BaseException, so it is named here.
        raise CorruptCheckpointError(f"{where}: reading the DCP checkpoint failed: {type(e).__name__}: {e}") from e
    return flat, paths


def _checked_path(path: object, fqn: str, where: str) -> tuple[Part, ...]:
    if not isinstance(path, tuple | list) or not path:
        raise CorruptCheckpointError(f"{where}: DCP key {fqn!r} records the path {path!r}, not a tuple of parts")
    for part in path:
        if not isinstance(part, str | int) or isinstance(part, bool) or (isinstance(part, int) and part < 0):
            raise CorruptCheckpointError(f"{where}: DCP key {fqn!r} has the path part {part!r} (not a str or list index)")
    return tuple(path)


def _place(root: _Node, path: tuple[Part, ...], value: object, where: str) -> None:
    node = root
    for i, part in enumerate(path):
        shown = "/".join(map(str, path[: i + 1]))
        if i + 1 == len(path):
            if part in node:
                raise CorruptCheckpointError(f"{where}: DCP entries {shown!r} and one below it cannot both exist in one state")
            node[part] = value
            return
        child = node.setdefault(part, _Node())
        if not isinstance(child, _Node):
            raise CorruptCheckpointError(f"{where}: DCP entries {shown!r} and {'/'.join(map(str, path))!r} "
                                         "cannot both exist in one state")
        node = child


def _finish(node: object, path: tuple[Part, ...], where: str, missing: list[str]) -> object:
    """Turn rebuilt containers into dicts (str parts) and lists (int parts)."""
    if not isinstance(node, _Node):
        return node
    items = [(part, _finish(child, path + (part,), where, missing)) for part, child in node.items()]
    indexes = [part for part, _ in items if isinstance(part, int)]
    if not indexes:
        return dict(items)
    shown = "/".join(map(str, path)) or "<root>"
    if len(indexes) != len(items):
        raise CorruptCheckpointError(f"{where}: DCP entries under {shown!r} mix list positions and names")
    size = max(indexes) + 1
    if len(missing) + size - len(items) > MAX_MISSING_ELEMENTS:
        raise CorruptCheckpointError(f"{where}: DCP list {shown!r} claims {size} elements but records {len(items)}")
    out: list[object] = [_EMPTY] * size
    for part, child in items:
        out[int(part)] = child
    for i, child in enumerate(out):
        if child is _EMPTY:
            missing.append(f"{shown}/{i}")
            out[i] = {}
    return out


_EMPTY = object()


def _restore_optimizer_ids(node: object) -> None:
    if isinstance(node, list):
        for child in node:
            _restore_optimizer_ids(child)
        return
    if not isinstance(node, dict):
        return
    state, groups = node.get("state"), node.get("param_groups")
    if isinstance(state, dict) and state and isinstance(groups, list):
        lists = [g.get("params") for g in groups if isinstance(g, dict)]
        ids = [p for params in lists if isinstance(params, list) for p in params]
        if ids and all(isinstance(p, int) and not isinstance(p, bool) for p in ids):
            by_name = {str(p): p for p in ids}
            if all(isinstance(k, str) and k in by_name for k in state):
                node["state"] = {by_name[str(k)]: v for k, v in state.items()}
    for child in node.values():
        _restore_optimizer_ids(child)
