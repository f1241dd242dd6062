"""Fixtures shared by the test folders."""

from __future__ import annotations

import threading

import pytest

from shardckpt.pipeline.staging import DeviceCopier


@pytest.fixture
def held_copy(monkeypatch):
    """Holds the snapshot inside its first copy until ``release`` is set, so that what the test
    does right after async_save surely happens before the copy (a real copy would win the race)."""
    copying, release = threading.Event(), threading.Event()
    real_copy, real_copy_host = DeviceCopier.copy, DeviceCopier.copy_host

    def copy(self, dst, src):
        copying.set()
        release.wait(60)
        return real_copy(self, dst, src)

    def copy_host(self, dsts, srcs):
        copying.set()
        release.wait(60)
        return real_copy_host(self, dsts, srcs)

    monkeypatch.setattr(DeviceCopier, "copy", copy)
    monkeypatch.setattr(DeviceCopier, "copy_host", copy_host)
    yield copying, release
    release.set()
