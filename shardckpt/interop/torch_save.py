"""Read a ``torch.save`` file for migration, with ``weights_only=True`` (torch's restricted unpickler)."""

from __future__ import annotations

import os

import torch

from shardckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError


def read_torch_save(path: str | os.PathLike[str]) -> dict[str, object]:
    """Everything in the ``torch.save`` file at ``path``, on the CPU; it must hold a dict.

    Example::

        state = read_torch_save("model.pt")
        shardckpt.save(state, "ckpt/migrated")
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: no such file") from e
    except Exception as e:  # noqa: BLE001 - a damaged file fails deep in torch.load with IndexError, struct.error, KeyError...
        raise CorruptCheckpointError(
            f"{path}: not a torch.save file that loads with weights_only=True: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: a torch.save file holding {type(loaded).__name__}, not a dict")
    return loaded
