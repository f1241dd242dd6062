"""Training state beyond tensors, for bit-identical resume: RNG streams, model + optimizer through
torch's distributed state-dict helpers, and a resumable distributed sampler."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from shardckpt.errors import StateMismatchError
from shardckpt.flatten import FlattenMemo, Parts, PerRank
from shardckpt.module_state import OptimizerRoute
from shardckpt.state_recipe import StateRecipe

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import DictValueType, OptimizerStateType


class RNGState:
    """The calling rank's RNG state: Python ``random``, NumPy's global generator, torch CPU and
    (when present) every CUDA device. Saved per rank and restored to the same rank.

    World-size rule: a rank that existed in the saved job gets its own streams back. A rank that
    did not (the job grew) is seeded with ``seed + rank`` in every generator, so each new rank has
    distinct, reproducible streams. ``restored`` tells which happened.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.restored: bool | None = None

    def state_dict(self) -> dict[str, object]:
        py_version, py_state, py_gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state: dict[str, object] = {
            "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
            "numpy": {
                "name": np_name,
                "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                "pos": int(np_pos),
                "has_gauss": int(np_has_gauss),
                "gauss": float(np_gauss),
            },
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        }
        return {"rank_state": PerRank(state, optional=True)}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        wrapped = state_dict.get("rank_state")
        inner = wrapped.value if isinstance(wrapped, PerRank) else wrapped
        if not isinstance(inner, dict):
            raise StateMismatchError(f"RNGState.load_state_dict got {type(inner).__name__}, not a dict")
        if isinstance(wrapped, PerRank) and wrapped.restored is False:
            self.restored = False
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            seed_everything(self.seed + rank)
            return
        py = inner["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        npst = inner["numpy"]
        np.random.set_state(
            (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
        )
        torch.set_rng_state(inner["torch"])
        cuda = inner["cuda"]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        self.restored = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class ModelOptimizerState:
    """A model and its optimizer as one stateful object, through
    ``torch.distributed.checkpoint.state_dict``: FSDP2 / TP DTensors stay sharded, plain and DDP
    models work too, and optimizer state is keyed by parameter name (so it re-shards)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        # Imported here, before the training loop: the first import costs ~90 ms on a 2-core
        # machine, which would otherwise land inside the first save's stall.
        import torch.distributed.checkpoint.state_dict  # noqa: F401

        self.model = model
        self.optimizer = optimizer
        self._recipe: StateRecipe | None = None

    def state_dict(self, initialize: bool = True) -> dict[str, object]:
        """torch's ``get_state_dict`` answer, detached. A load passes ``initialize=False`` when
        the checkpoint holds no optimizer state (saved before the first step): then an optimizer
        without state is not given one by torch's zero-lr step either."""
        sd = self._state_dict(initialize)
        model = cast("dict[str, object]", sd["model"])
        sd["model"] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in model.items()}
        return sd

    @property
    def flatten_memo(self) -> FlattenMemo | None:
        """Where flatten keeps the save items of this object's tensors while the recipe holds."""
        return self._recipe.flatten_memo if self._recipe is not None else None

    def leaves_for_save(self) -> list[tuple[Parts, object]] | None:
        """``state_dict_for_save()``'s tensors and values with their paths, while the recipe
        holds and they are all flatten would find (StateRecipe.leaves); else None."""
        if self._recipe is None or self.optimizer is None:
            return None
        return self._recipe.leaves(self.model, self.optimizer)

    def state_dict_for_save(self) -> dict[str, object]:
        """``state_dict()`` with the registered tensors themselves in place of their ``detach()``:
        a save only reads them. Repeated saves of an unchanged model and optimizer reuse the names
        of the last answer (state_recipe.py) instead of recomputing them."""
        return self._state_dict(initialize=False)

    def _state_dict(self, initialize: bool) -> dict[str, object]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        if not self.optimizer.state and not initialize:
            # Not stepped yet: get_state_dict would create the optimizer's state with a zero-lr
            # step (Adam's step count 1, SGD's momentum buffers), and a save must not change the
            # run. The same no-step answer as a {"model", "optim"} save (module_state.py).
            return {"model": get_model_state_dict(self.model),
                    "optim": OptimizerRoute(self.model, self.optimizer, None).state_dict()}
        if self._recipe is not None:
            got = self._recipe.answer(self.model, self.optimizer)
            if got is not None:
                return {"model": got[0], "optim": got[1]}
        msd, osd = get_state_dict(self.model, self.optimizer)
        self._recipe = StateRecipe.learn(
            self.model, self.optimizer, cast("dict[str, object]", msd), cast("dict[str, object]", osd)
        )
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        # The casts name what state_dict() above stored under each key (torch's own state-dict types).
        if self.optimizer is None:
            set_model_state_dict(self.model, cast("DictValueType", state_dict["model"]))
        else:
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=cast("DictValueType", state_dict["model"]),
                optim_state_dict=cast("OptimizerStateType", state_dict["optim"]),
            )


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A distributed sampler that remembers how far it got.

    Each epoch is a permutation seeded by ``(seed, epoch)``; the position counts samples taken by
    the whole job, so a resume on another world size continues exactly where the job stopped:
    rank ``r`` of ``w`` takes samples ``position + r, position + r + w, ...``. The position moves
    as indices are handed out, by iterating (a ``DataLoader``'s sampler) or by ``next_indices``;
    it is global, so the saved value is the same on every rank. An epoch iterated to its end
    moves on to the next one.

    A ``DataLoader`` with worker processes asks for indices ``prefetch_factor * num_workers``
    batches ahead of their use; those count as taken, and a resume skips them. Where every
    sample must be seen exactly once, use ``num_workers=0`` or ``next_indices``.
    """

    def __init__(self, data: Sized | int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.size = data if isinstance(data, int) else len(data)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position + self.rank < self.size:
            i = self.position + self.rank
            self.position += self.world_size  # taken once handed out: a save after it resumes past it
            yield order[i]
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return max(0, (self.size - self.position - self.rank + self.world_size - 1) // self.world_size)

    def next_indices(self, per_rank: int) -> list[int]:
        """This rank's next ``per_rank`` sample indices; advances the global position, wrapping
        into the next epoch when the current one runs out."""
        if self.position + per_rank * self.world_size > self.size:
            self.epoch += 1
            self.position = 0
        order = self._order()
        start = self.position + self.rank
        out = [order[start + i * self.world_size] for i in range(per_rank)]
        self.position += per_rank * self.world_size
        return out

    def state_dict(self) -> dict[str, object]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        if state_dict.get("size") != self.size:
            raise StateMismatchError(f"sampler was saved over {state_dict.get('size')} samples, not {self.size}")
        self.epoch = int(state_dict["epoch"])  # type: ignore[call-overload]
        self.position = int(state_dict["position"])  # type: ignore[call-overload]
        self.seed = int(state_dict["seed"])  # type: ignore[call-overload]
