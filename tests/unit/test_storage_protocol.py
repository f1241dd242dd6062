"""The ``Storage`` protocol is what every backend implements, method for method: the interface
that every path uses must not drift from the backends that exist."""

from __future__ import annotations

import inspect

import pytest

from shardckpt.storage import DataFileWriter, DataWriter, LocalStorage, Storage, StorageLock
from shardckpt.storage.lock import PathLock
from shardckpt.storage.s3 import S3DataWriter, S3Storage, _SingleWriter

pytestmark = pytest.mark.timeout(30)


def _public(cls: type) -> dict[str, object]:
    return {name: value for name, value in vars(cls).items() if not name.startswith("_")}


def _parameters(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize(("protocol", "backend"), [
    (Storage, LocalStorage), (Storage, S3Storage), (DataWriter, DataFileWriter), (DataWriter, S3DataWriter),
    (StorageLock, PathLock), (StorageLock, _SingleWriter),
])
def test_backend_implements_the_protocol(protocol, backend):
    wanted, have = _public(protocol), _public(backend)
    missing = sorted(set(wanted) - set(have))
    assert not missing, f"{backend.__name__} lacks {missing}"
    for name, member in wanted.items():
        if isinstance(member, property):
            assert isinstance(have[name], property), f"{backend.__name__}.{name} must be a property"
            continue
        assert _parameters(member) == _parameters(have[name]), f"{backend.__name__}.{name}: parameters differ"


def test_every_path_uses_the_protocol_not_a_backend():
    # The modules that save, load, verify, list and clean up name no backend class: they get
    # one from open_storage, so an s3:// location takes the same path as a directory.
    import shardckpt.api
    import shardckpt.cleanup
    import shardckpt.cli
    import shardckpt.commit
    import shardckpt.manager
    import shardckpt.pipeline.reader
    import shardckpt.saving

    for module in (shardckpt.api, shardckpt.cleanup, shardckpt.cli, shardckpt.commit, shardckpt.manager,
                   shardckpt.pipeline.reader, shardckpt.saving):
        source = inspect.getsource(module)
        for backend in ("LocalStorage", "S3Storage", "PathLock"):
            assert backend not in source, f"{module.__name__} uses {backend} directly"
