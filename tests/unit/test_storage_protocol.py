"""The ``Storage`` protocol is exactly what ``LocalStorage`` implements: the interface that every
path is to use must not drift from the one backend that exists."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from shardckpt.storage import LocalStorage, Storage

pytestmark = pytest.mark.timeout(30)


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(value) for name, value in vars(cls).items()
            if callable(value) and not name.startswith("_")}


def test_storage_protocol_matches_local_storage():
    protocol, local = _public_methods(Storage), _public_methods(LocalStorage)
    assert sorted(protocol) == sorted(local), "methods the protocol and LocalStorage do not share"
    for name, signature in protocol.items():
        assert signature == local[name], f"{name}: protocol {signature}, LocalStorage {local[name]}"
    assert Storage.__annotations__ == {"root": "Path"} and isinstance(LocalStorage("ckpt").root, Path)
