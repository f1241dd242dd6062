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
    real_copy = DeviceCopier.copy

    def copy(self, dst, src):
        copying.set()
        release.wait(60)
        return real_copy(self, dst, src)

    monkeypatch.setattr(DeviceCopier, "copy", copy)
    yield copying, release
    release.set()
