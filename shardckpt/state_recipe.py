"""What ``get_state_dict(model, optimizer)`` returns, remembered across saves of an unchanged model.

torch's ``get_state_dict`` recomputes every parameter's name on every call: about 3.5 ms for the
demo's 164 tensors, a fifth of a small state's save stall. Its answer depends only on the module
tree, which tensors are registered where, the state-dict hooks, and which parameters the optimizer
holds and has state for. A ``StateRecipe`` learns the answer from one real call and checks that
all of those are unchanged before it answers again (``Structure``); on any change the real call
runs and the recipe is learned anew.

The recipe returns the live tensors and the optimizer's live per-parameter state dicts, as
torch does (it only detaches), so the data read is always current: what is remembered is names,
never values. It is learned only where the real call is a pure renaming:
- no FSDP1 module, no module that overrides ``state_dict`` / ``_save_to_state_dict`` or has extra
  state, no state-dict hook but FSDP2's own resharding pre-hook (whose effect, re-registering the
  sharded parameters, shows as a structure change);
- a plain ``torch.optim.Optimizer.state_dict`` without hooks, with state for some parameter;
- every returned tensor is one registered in the module tree under that name, and every returned
  optimizer state is the optimizer's own dict for that parameter.
Otherwise every save takes the real call, as before.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from shardckpt.flatten import FlattenMemo, Parts, contains_tensors, data_place

# FSDP2 registers this pre-hook on each module that holds sharded parameters: it reshards them
# before a state_dict. A structure check covers it: unsharded parameters are other objects.
_FSDP2_HOOK = "FSDPParamGroup._register_state_dict_hooks.<locals>.to_sharded_hook"


def _modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name prefix as get_model_state_dict writes it, module), in state_dict order: a DDP
    wrapper's ``module`` and torch.compile's ``_orig_mod`` add nothing to the names."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, module = stack.pop()
        yield prefix, module
        wrapper = isinstance(module, DistributedDataParallel | OptimizedModule)
        children = [
            (prefix if wrapper and name in ("module", "_orig_mod") else f"{prefix}{name}.", child)
            for name, child in module._modules.items()
            if child is not None
        ]
        stack.extend(reversed(children))


def _structure(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[tuple[object, ...], list[object]]:
    """Everything the names in get_state_dict's answer depend on, by identity and cheap to build,
    with the objects whose ids it holds: a recipe keeps them alive, so no id is reused by a new
    module, tensor or hook while the recipe can still match it."""
    parts: list[object] = []
    alive: list[object] = [optimizer]
    for prefix, m in _modules(model):
        hooks = (*m._state_dict_hooks.values(), *m._state_dict_pre_hooks.values())
        alive += (m, *m._parameters.values(), *m._buffers.values(), *hooks)
        parts.append((prefix, id(m), type(m), len(m._state_dict_hooks), tuple(map(id, hooks))))
        parts.append(tuple((k, id(v)) for k, v in m._parameters.items()))
        parts.append(tuple((k, id(v), k in m._non_persistent_buffers_set) for k, v in m._buffers.items()))
    for group in optimizer.param_groups:
        alive += group["params"]
        parts.append(tuple(map(id, group["params"])))
    alive += optimizer.state
    parts.append(tuple(map(id, optimizer.state)))
    return tuple(parts), alive


def _plain_module(m: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    kind = type(m)
    return (
        not isinstance(m, FullyShardedDataParallel)
        and kind.state_dict is nn.Module.state_dict
        and kind._save_to_state_dict is nn.Module._save_to_state_dict
        and kind.get_extra_state is nn.Module.get_extra_state
        and not m._state_dict_hooks
        and all(getattr(h, "__qualname__", "") == _FSDP2_HOOK for h in m._state_dict_pre_hooks.values())
    )


def _plain_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    return (
        type(optimizer).state_dict is torch.optim.Optimizer.state_dict
        and not optimizer._optimizer_state_dict_pre_hooks
        and not optimizer._optimizer_state_dict_post_hooks
        and bool(optimizer.state)
    )


class StateRecipe:
    """The names of one ``get_state_dict(model, optimizer)`` answer, for as long as the structure
    they came from is unchanged."""

    def __init__(self, structure: tuple[tuple[object, ...], list[object]], model_entries: list[tuple[str, torch.Tensor]],
                 optim_entries: list[tuple[str, torch.Tensor]], group_names: list[list[str]]) -> None:
        self.structure, self._alive = structure
        self.model_entries = model_entries  # (name, registered tensor), in the answer's order
        self.optim_entries = optim_entries  # (name, parameter), in optimizer.state order
        self.group_names = group_names  # each param group's parameter names
        self.flatten_memo = FlattenMemo()  # what flatten.py keeps of these tensors
        self._model_leaves: list[tuple[Parts, object]] = [(("model", name), t) for name, t in model_entries]

    @classmethod
    def learn(cls, model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict[str, object],
              osd: dict[str, object]) -> StateRecipe | None:
        """A recipe that gives ``msd`` and ``osd`` again, or None where get_state_dict did more than
        rename (see the module docstring)."""
        if not _plain_optimizer(optimizer):
            return None
        registered: dict[str, torch.Tensor] = {}
        for prefix, m in _modules(model):
            if not _plain_module(m):
                return None
            for name, p in m._parameters.items():
                if p is not None:
                    registered.setdefault(prefix + name, p)
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent_buffers_set:
                    registered.setdefault(prefix + name, b)
        if len(registered) != len(msd):
            return None
        model_entries: list[tuple[str, torch.Tensor]] = []
        for name, value in msd.items():
            tensor = registered.get(name)
            if tensor is None or not isinstance(value, torch.Tensor) or data_place(value) != data_place(tensor):
                return None
            model_entries.append((name, tensor))
        state, groups = osd.get("state"), osd.get("param_groups")
        if not isinstance(state, dict) or not isinstance(groups, list) or len(state) != len(optimizer.state):
            return None
        optim_entries: list[tuple[str, torch.Tensor]] = []
        for (param, own), (name, given) in zip(optimizer.state.items(), state.items(), strict=True):
            if given is not own or not isinstance(name, str) or not isinstance(param, torch.Tensor):
                return None
            optim_entries.append((name, param))
        if len(groups) != len(optimizer.param_groups):
            return None
        group_names: list[list[str]] = []
        for given_group, group in zip(groups, optimizer.param_groups, strict=True):
            names = given_group.get("params") if isinstance(given_group, dict) else None
            if names is None or len(names) != len(group["params"]) or given_group.keys() != group.keys():
                return None
            if any(given_group[k] is not v for k, v in group.items() if k != "params"):
                return None
            group_names.append(list(names))
        return cls(_structure(model, optimizer), model_entries, optim_entries, group_names)

    def answer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, object], dict[str, object]] | None:
        """(model state dict, optimizer state dict) as get_state_dict would give them now, with
        the registered tensors themselves in place of their ``detach()``; None when anything
        they depend on changed."""
        if not self._holds(model, optimizer):
            return None
        msd: dict[str, object] = dict(self.model_entries)
        state = {name: optimizer.state[param] for name, param in self.optim_entries}
        return msd, {"state": state, "param_groups": self._groups(optimizer)}

    def leaves(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[Parts, object]] | None:
        """``answer``'s leaves, as (path under the answer, tensor or value) in the order flatten
        walks the answer; None when ``answer`` would give None, or when walking it would go
        into anything but tensors (a state value that is not a tensor, an empty state, tensors
        in the param groups): then flatten walks the answer itself."""
        if not self.model_entries or not self._holds(model, optimizer):
            return None
        out = list(self._model_leaves)
        for name, param in self.optim_entries:
            own = optimizer.state[param]
            if not own:
                return None
            for key, value in own.items():
                if not isinstance(value, torch.Tensor):
                    return None
                out.append((("optim", "state", name, key), value))
        groups = self._groups(optimizer)
        if contains_tensors(groups):
            return None
        out.append((("optim", "param_groups"), groups))
        return out

    def _holds(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the model and optimizer still have the structure this recipe was taken from."""
        return _plain_optimizer(optimizer) and _structure(model, optimizer)[0] == self.structure

    def _groups(self, optimizer: torch.optim.Optimizer) -> list[dict[str, object]]:
        """The param groups as get_state_dict gives them: the current hyperparameters, the names."""
        return [
            {**{k: v for k, v in group.items() if k != "params"}, "params": list(names)}
            for group, names in zip(optimizer.param_groups, self.group_names, strict=True)
        ]
