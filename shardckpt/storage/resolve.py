"""From a path or URL to the storage backend that holds it.

    ckpt/step-100, /mnt/ckpt, Path(...)   local directory (LocalStorage)
    file:///mnt/ckpt                      local directory
    s3://bucket/prefix                    S3 or an S3-compatible store (S3Storage; needs boto3)
    anything else with a scheme           UnsupportedStorageError, never a local directory

A string that starts with ``name:`` (two or more letters, digits, ``+ - .``) is a URL. So a
relative directory whose first component ends in a colon must be written ``./run:1``. A
``pathlib.Path`` made from a URL collapses its ``//`` (``Path("s3://b/x")`` is ``s3:/b/x``); it
is read back as the same URL rather than as a directory named ``s3:``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shardckpt.errors import UnsupportedStorageError
from shardckpt.storage.base import Storage
from shardckpt.storage.local import LocalStorage

if TYPE_CHECKING:
    from shardckpt.storage.s3 import S3Options

# RFC 3986 scheme, two characters at least (a one-letter "scheme" would be a drive letter).
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(.*)", re.DOTALL)
SCHEMES = ("file", "s3")


@dataclass(frozen=True)
class Location:
    """A parsed checkpoint location: ``scheme`` ``file`` (``path`` set) or ``s3`` (``bucket``, ``prefix``)."""

    scheme: str
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""

    @property
    def url(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def join(self, name: str) -> Path | str:
        """The location of ``name`` inside this one: a ``Path`` when local, a URL string otherwise."""
        if self.path is not None:
            return self.path / name
        return f"{self.url}/{name}"


def parse_location(where: str | os.PathLike[str]) -> Location:
    """Parse a path or URL (see the module docstring); raises ``UnsupportedStorageError`` for a
    scheme with no backend and for a malformed ``s3://`` or ``file://`` URL."""
    text = os.fspath(where)
    m = _SCHEME.fullmatch(text)
    if m is None:
        return Location("file", path=Path(text))
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        # file:///abs, file://localhost/abs, and file:/abs (a Path made from a file:// URL).
        if rest.startswith("//"):
            host, slash, path = rest[2:].partition("/")
            if host not in ("", "localhost") or not slash:
                raise UnsupportedStorageError(f"{text}: a file:// URL names a local path (file:///dir); "
                                              f"host {host!r} is not supported")
            return Location("file", path=Path("/" + path))
        if rest.startswith("/"):
            return Location("file", path=Path(rest))
        raise UnsupportedStorageError(f"{text}: a file URL needs an absolute path (file:///dir)")
    if scheme == "s3":
        body = rest[2:] if rest.startswith("//") else rest[1:] if rest.startswith("/") else None
        if body is None:
            raise UnsupportedStorageError(f"{text}: an S3 location is written s3://bucket/prefix")
        bucket, _, prefix = body.partition("/")
        prefix = prefix.strip("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise UnsupportedStorageError(f"{text}: {bucket!r} is not a valid bucket name (3-63 characters: "
                                          "lowercase letters, digits, dots and hyphens); write s3://bucket/prefix")
        if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
            raise UnsupportedStorageError(f"{text}: the prefix must be plain names separated by single slashes")
        return Location("s3", bucket=bucket, prefix=prefix)
    raise UnsupportedStorageError(
        f"{text}: no storage backend for the URL scheme {scheme!r} (supported: local paths, file://, s3://). "
        "It is not taken as a local directory; for a local directory whose first name has a colon, write it as "
        "./NAME or as an absolute path"
    )


def open_storage(where: str | os.PathLike[str], *, s3: S3Options | None = None) -> Storage:
    """The storage for a path or URL. ``s3`` overrides what the AWS environment says for an
    ``s3://`` location (endpoint, credentials, region, part size...; see ``S3Options``).

    Example::

        storage = open_storage("s3://my-bucket/runs/7/step-100")
        storage = open_storage("s3://ckpt/run", s3=S3Options(endpoint_url="http://127.0.0.1:9000"))
    """
    loc = parse_location(where)
    if loc.path is not None:
        return LocalStorage(loc.path)
    from shardckpt.storage.s3 import S3Storage  # imports boto3: only when an s3:// URL is used

    return S3Storage(loc.bucket, loc.prefix, s3)
