"""A fresh optimizer's state, created in the shape the checkpoint holds, for a load to fill.

A load needs a template of the optimizer's state: tensors to read into. A fresh optimizer has no
state, and torch's state-dict helpers create it by running a step over zero gradients at lr 0:
a gradient and a full optimizer step over every parameter, whose results the load then overwrites.
On launch/train.py's 1.13 GiB restore (2 ranks, FSDP2, AdamW) that step was 0.63 s of a 1.06 s
load. Here the state is created from the checkpoint instead: for each parameter with saved state,
an uninitialized tensor laid out like the parameter (a DTensor for a sharded one) per saved
tensor of the parameter's shape, a 0-d tensor per saved scalar tensor (Adam's step), and the saved
value of anything else. Only what the checkpoint names is created, so the template has exactly its
keys; the read then fills every byte (a load fails unless all of a tensor is covered).

Anything it cannot mirror (a saved tensor of another shape, such as a factored second moment; a
name it cannot map to one parameter) leaves the optimizer alone and torch's way runs as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shardckpt.format.schema import TensorEntry, ValueEntry
from shardckpt.format.values import decode_value

# Per parameter name (as the checkpoint keys it), per state name, the saved entry.
SavedState = Mapping[str, Mapping[str, TensorEntry | ValueEntry]]


def prefill(model: nn.Module, optimizer: torch.optim.Optimizer, saved: SavedState, where: str) -> bool:
    """Give ``optimizer`` (which must have no state) the state ``saved`` describes, uninitialized;
    False, with nothing changed, when the layout is not one this can mirror."""
    if optimizer.state or not saved:
        return False
    by_name = _params_by_name(model)
    if by_name is None:
        return False
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    state: dict[torch.Tensor, dict[str, object]] = {}
    for name, entries in saved.items():
        param = by_name.get(name)
        if param is None or id(param) not in in_optimizer:
            return False
        made: dict[str, object] = {}
        for key, entry in entries.items():
            if isinstance(entry, ValueEntry):
                made[key] = decode_value(entry.value, f"{where}: value {entry.key!r}")
            elif entry.shape == tuple(param.shape):
                made[key] = torch.empty_like(param, dtype=entry.torch_dtype, requires_grad=False)
            elif entry.shape == ():
                made[key] = torch.zeros((), dtype=entry.torch_dtype)
            else:
                return False
        state[param] = made
    optimizer.state.update(state)
    return True


def _params_by_name(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's parameters by the name torch's state-dict helpers give them (DDP's ``module.``
    and torch.compile's ``_orig_mod.`` dropped); None where a name stands for several parameters."""
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns
    except ImportError:  # a torch without it: its own initializing step runs instead
        return None
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        fqns = _get_fqns(model, name)
        if len(fqns) != 1:
            return None  # FSDP1's flat parameters
        out[next(iter(fqns))] = param
    return out
