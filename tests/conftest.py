"""Fixtures shared by the test folders."""

from __future__ import annotations

import os
import tempfile
import threading

import pytest

from shardckpt.pipeline.staging import DeviceCopier


@pytest.fixture(scope="session", autouse=True)
def scratch_tmpdir(tmp_path_factory):
    """Points TMPDIR at pytest's own temporary tree for the session, so that what the processes
    the tests start leave behind there (torchrun's agents never remove their torchelastic_* log
    folders, and a killed agent cannot) is pruned with pytest's old runs, not left in /tmp."""
    scratch = tmp_path_factory.mktemp("tmpdir")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = None
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


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
