"""``nn.Module`` and ``torch.optim.Optimizer`` objects in a state go through
``torch.distributed.checkpoint.state_dict``, the way ``ModelOptimizerState`` does.

Their own ``state_dict()`` is the wrong thing to save for sharded models. An optimizer keys its
state by int position, and on load a fresh optimizer has no state to fill, so its moments came back
as plain full-size tensors next to FSDP2's DTensor parameters; the next ``step()`` then failed.
Through ``get_optimizer_state_dict`` the state is keyed by parameter name, and its template holds
DTensors shaped like the parameters, so each rank loads its own shard. That needs the model: an
optimizer is paired with the one module of the state that owns all its parameters. The layout is
the one ``get_state_dict(model, optim)`` gives, so ``{"model": model, "optim": optim}`` and
``{"model": msd, "optim": osd}`` save the same checkpoint (and a DCP one migrated by
``shardckpt convert --from dcp`` loads into either).

An optimizer whose module is not in the state keeps its own ``state_dict()`` when none of its
parameters is a DTensor (one process, DDP); with DTensor parameters it is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from shardckpt.errors import StateMismatchError
from shardckpt.flatten import MAX_NESTING, PerRank, is_stateful, join_key
from shardckpt.format.schema import PathPart

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import DictValueType, OptimizerStateType

HasSaved = Callable[[tuple[PathPart, ...]], bool]


class ModuleRoute:
    """Saves and loads a module through ``get_model_state_dict`` / ``set_model_state_dict``
    (DTensors stay sharded; DDP's ``module.`` and ``torch.compile``'s prefixes are dropped)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, object]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return cast("dict[str, object]", get_model_state_dict(self.module))

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, cast("DictValueType", state_dict))


class OptimizerRoute:
    """Saves and loads an optimizer through ``get_optimizer_state_dict`` /
    ``set_optimizer_state_dict`` with its model: state keyed by parameter name, DTensor moments.

    ``saved_state`` is None when saving; when loading, whether the checkpoint holds any entry under
    the optimizer's ``state`` (an optimizer saved before its first step holds none)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, saved_state: bool | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.saved_state = saved_state

    def state_dict(self) -> dict[str, object]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if not self.optimizer.state and self.saved_state is not True:
            # Saving an optimizer that has not stepped (or loading a checkpoint of one):
            # get_optimizer_state_dict would first create its state with a zero-lr step, which
            # advances Adam's step count. A save must not change the training run.
            return self._without_initializing()
        sd = cast("dict[str, object]", get_optimizer_state_dict(self.model, self.optimizer))
        if self.saved_state is False:
            sd["state"] = {}  # the checkpoint's optimizer had no state: neither will this one
        return sd

    def _without_initializing(self) -> dict[str, object]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not params or any(p.grad is not None for p in params):
            # torch creates no state when a gradient exists: nothing to avoid.
            return cast("dict[str, object]", get_optimizer_state_dict(self.model, self.optimizer))
        # One gradient (never read: no step runs) tells torch the state needs no creating.
        first = params[0]
        first.grad = torch.empty_like(first)
        try:
            return cast("dict[str, object]", get_optimizer_state_dict(self.model, self.optimizer))
        finally:
            first.grad = None

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, cast("OptimizerStateType", state_dict))


def route_modules(state: dict[str, object], has_saved: HasSaved | None = None) -> dict[int, object]:
    """The stateful object to use, by ``id``, for each module and optimizer found in ``state``
    (in its dicts, lists, tuples and ``PerRank`` wrappers; not inside other stateful objects).
    ``has_saved`` is None for a save; for a load it says whether the checkpoint holds entries
    under a path."""
    modules: list[tuple[tuple[PathPart, ...], nn.Module]] = []
    optimizers: list[tuple[tuple[PathPart, ...], torch.optim.Optimizer]] = []
    _find(state, modules, optimizers)
    if not optimizers and not modules:
        return {}
    routes: dict[int, object] = {id(m): ModuleRoute(m) for _, m in modules}
    owned = {id(m): {id(p) for p in m.parameters()} for _, m in modules}
    for path, optimizer in optimizers:
        if id(optimizer) in routes:
            continue
        ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
        owners = {id(m): (mpath, m) for mpath, m in modules if all(i in owned[id(m)] for i in ids)}
        key = join_key(path)
        if len(owners) > 1:
            names = sorted(join_key(mpath) for mpath, _ in owners.values())
            raise StateMismatchError(
                f"the optimizer at key {key!r} can be paired with the modules at keys {names}; keep only the one it "
                "was built over in the state, or pass ModelOptimizerState(model, optimizer)"
            )
        if owners:
            ((_, model),) = owners.values()
            saved = None if has_saved is None else has_saved(path + ("state",))
            routes[id(optimizer)] = OptimizerRoute(model, optimizer, saved)
        elif any(hasattr(p, "to_local") for group in optimizer.param_groups for p in group["params"]):
            raise StateMismatchError(
                f"the optimizer at key {key!r} has DTensor parameters but its model is not in the state, so its "
                "state cannot be saved or loaded sharded; pass {'model': model, 'optim': optimizer}, "
                "ModelOptimizerState(model, optimizer), or the dicts of get_state_dict(model, optimizer)"
            )
    return routes


def _find(
    state: dict[str, object],
    modules: list[tuple[tuple[PathPart, ...], nn.Module]],
    optimizers: list[tuple[tuple[PathPart, ...], torch.optim.Optimizer]],
) -> None:
    stack: list[tuple[object, tuple[PathPart, ...]]] = [(state, ())]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if isinstance(node, PerRank):
            stack.append((node.value, path))
        elif isinstance(node, nn.Module):
            modules.append((path, node))
        elif isinstance(node, torch.optim.Optimizer):
            optimizers.append((path, node))
        elif isinstance(node, dict | list | tuple) and not is_stateful(node) and id(node) not in seen:
            # The walks that follow refuse deeper or self-containing states, naming the key.
            if len(path) > MAX_NESTING:
                continue
            seen.add(id(node))
            children = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((child, path + (part,)) for part, child in reversed(list(children))
                         if isinstance(part, str | int))
